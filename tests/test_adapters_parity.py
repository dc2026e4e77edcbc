"""Linear probe, Tip-Adapter(-F), GDA and CLIP-Adapter against re-statements of their reference code.

Each reference side below is written from the reference repository's code as it runs (file and lines
cited), on its own copy of the backbone (``ref_openclip``) and on plain tensors: it uses none of
promptlab's methods or prompt helpers. promptlab's side is the method's ``fit`` and ``forward``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.engine import make_schedule
from promptlab.methods import GDA, CLIPAdapter, LinearProbe, TipAdapter
from promptlab.methods.gda import gaussian_classifier, synthesized_classifier
from promptlab.prompts import FitData

CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "red car"]
TEMPLATE = "a photo of a {}, a type of pet."


def ref_clip_classifier(model, classnames, template):
    """gaopengcuhk/Tip-Adapter utils.py L18-35 (mrflogs/ICLR24 utils.py clip_classifier is the same): [D, C]."""
    with torch.no_grad():
        clip_weights = []
        for classname in classnames:
            classname = classname.replace("_", " ")
            texts = open_clip.tokenize([t.format(classname) for t in template])
            class_embeddings = model.encode_text(texts)
            class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding /= class_embedding.norm()
            clip_weights.append(class_embedding)
        return torch.stack(clip_weights, dim=1)


def features(
    seed: int, n_per_class: int, views: int = 1, d: int = 32, c: int = len(CLASSNAMES), noise: float = 1.5
):
    """Clustered random features [V, N, D] (class means + noise) and labels [N]: a search has a winner."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g) * 2
    labels = torch.arange(c).repeat_interleave(n_per_class)
    x = means[labels] + torch.randn(views, len(labels), d, generator=g) * noise
    return x, labels


def cls_acc(output, target):
    """Tip-Adapter utils.py L10-15 (``[0]``: numpy 2 no longer converts a 1-element array with ``float``)."""
    pred = output.topk(1, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return (
        100 * float(correct[:1].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / target.shape[0]
    )


def norm(t):
    """A feature over its L2 norm, as every reference's feature loader does (e.g. Tip-Adapter utils.py
    pre_load_features, mrflogs/ICLR24 main_few_shots.py L49)."""
    return t / t.norm(dim=-1, keepdim=True)


def ref_samples(train_views, labels):
    """mrflogs/ICLR24 main_few_shots.py L41-53 (main_base2new.py the same): every view of every image,
    normalised, is one sample; [V * N, D] and its labels."""
    return torch.cat([norm(v) for v in train_views]), torch.cat([labels] * train_views.shape[0])


# ---------------------------------------------------------------------- linear probe
def ref_lpclip(train_x, train_y, val_x, val_y, num_step=8, max_iter=1000):
    """KaiyangZhou/CoOp lpclip/linear_probe.py L55-116: coarse sweep, then the interval search; the
    classifier of the last round. (``penalty="l2"`` is scikit-learn's default; naming it warns since 1.8.)
    Also returns every (C, val accuracy) it fitted, in order (the reference prints them)."""
    from sklearn.linear_model import LogisticRegression

    tried = []

    def fit(c):
        clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(train_x, train_y)
        tried.append((c, sum(clf.predict(val_x) == val_y) / len(val_y)))
        return clf

    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = []
    for c_weight in search_list:
        pred = fit(c_weight).predict(val_x)
        acc_list.append(sum(pred == val_y) / len(val_y))
    c_peak = search_list[np.argmax(acc_list)]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    clf_final = c_final = None
    for _ in range(num_step):
        clf_left, clf_right = fit(c_left), fit(c_right)
        acc_left = sum(clf_left.predict(val_x) == val_y) / len(val_y)
        acc_right = sum(clf_right.predict(val_x) == val_y) / len(val_y)
        if acc_left < acc_right:
            c_final, clf_final = c_right, clf_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final, clf_final = c_left, clf_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return c_final, clf_final, tried


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_matches_lpclip(tiny_clip):
    train, y = features(0, 4)
    val, yv = features(0, 2)  # same class means (seed), other draws
    test, yt = features(0, 10)
    x, xv = train[0].double().numpy(), val[0].double().numpy()
    c_ref, clf, _ = ref_lpclip(x, y.numpy(), xv, yv.numpy(), num_step=3)

    lp = LinearProbe(tiny_clip, CLASSNAMES, search_steps=3)
    record = lp.fit(FitData(train, y, val[0], yv))
    assert record["C"] == pytest.approx(c_ref)
    assert len(record["search"]) == 7 + 2 * 3  # every fit of the search is recorded
    torch.testing.assert_close(lp.weight, torch.from_numpy(clf.coef_).float())
    torch.testing.assert_close(lp.bias, torch.from_numpy(clf.intercept_).float())
    logits = lp(image_features=test[0])
    ref = torch.from_numpy(clf.decision_function(test[0].double().numpy())).float()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1).numpy() == clf.predict(test[0].double().numpy())).all()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_search_fits_what_lpclip_fits(tiny_clip):
    """Noisy features, where the coarse sweep peaks inside its list (C = 1e-4) and the interval search
    moves right, right, then left before a fourth round: every (C, val accuracy) fitted is lpclip's, in
    its order, and the classifier kept is its last round's."""
    train, y = features(4, 4, noise=6.0)
    val, yv = features(4, 5, noise=6.0)
    x, xv = train[0].double().numpy(), val[0].double().numpy()
    c_ref, clf, tried = ref_lpclip(x, y.numpy(), xv, yv.numpy(), num_step=4)
    coarse, rounds = tried[:7], list(zip(tried[7::2], tried[8::2]))
    assert coarse[int(np.argmax([a for _, a in coarse]))][0] == 1e-4
    moves = ["right" if hi[1] > lo[1] else "left" for lo, hi in rounds]
    assert moves[:3] == ["right", "right", "left"]  # each move followed by a round that fits its interval

    lp = LinearProbe(tiny_clip, CLASSNAMES, search_steps=4)
    record = lp.fit(FitData(train, y, val[0], yv))
    assert record["C"] == pytest.approx(c_ref)
    assert record["search"] == [
        {"C": pytest.approx(c), "val_accuracy": pytest.approx(100 * a)} for c, a in tried
    ]
    torch.testing.assert_close(lp.weight, torch.from_numpy(clf.coef_).float())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_without_interval_search_refits_the_coarse_peak(tiny_clip):
    """``search_steps: 0`` (no round of the interval search): the coarse sweep's best C, fitted again, with
    the ``max_iter`` asked for (2 here: far from converged, so a fit with another budget differs)."""
    from sklearn.linear_model import LogisticRegression

    train, y = features(4, 4, noise=6.0)
    val, yv = features(4, 5, noise=6.0)
    x, xv = train[0].double().numpy(), val[0].double().numpy()
    _, _, coarse = ref_lpclip(x, y.numpy(), xv, yv.numpy(), num_step=0, max_iter=2)
    peak = coarse[int(np.argmax([a for _, a in coarse]))][0]
    clf = LogisticRegression(solver="lbfgs", max_iter=2, C=peak).fit(x, y.numpy())

    lp = LinearProbe(tiny_clip, CLASSNAMES, search_steps=0, max_iter=2)
    record = lp.fit(FitData(train, y, val[0], yv))
    assert record["C"] == peak and len(record["search"]) == 7 + 1
    assert record["search"][:7] == [{"C": c, "val_accuracy": pytest.approx(100 * a)} for c, a in coarse]
    torch.testing.assert_close(lp.weight, torch.from_numpy(clf.coef_).float())
    torch.testing.assert_close(lp.bias, torch.from_numpy(clf.intercept_).float())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_two_classes_scores_both(tiny_clip):
    """Two classes: scikit-learn keeps one row (class 1's score, ``decision_function``); the probe scores
    class 0 with zeros beside it, so its logits' difference is that score and its argmax the prediction."""
    train, y = features(1, 4, c=2, d=tiny_clip.embed_dim)
    val, yv = features(1, 3, c=2, d=tiny_clip.embed_dim)
    test, _ = features(1, 5, c=2, d=tiny_clip.embed_dim)
    x = train[0].double().numpy()
    c_ref, clf, _ = ref_lpclip(x, y.numpy(), val[0].double().numpy(), yv.numpy(), num_step=1)
    lp = LinearProbe(tiny_clip, ["cat", "dog"], search_steps=1)
    assert lp.fit(FitData(train, y, val[0], yv))["C"] == pytest.approx(c_ref)
    assert lp.weight.shape == (2, tiny_clip.embed_dim) and not lp.weight[0].any() and lp.bias[0] == 0
    torch.testing.assert_close(lp.weight[1:], torch.from_numpy(clf.coef_).float())
    torch.testing.assert_close(lp.bias[1:], torch.from_numpy(clf.intercept_).float())
    logits = lp(image_features=test[0])
    score = torch.from_numpy(clf.decision_function(test[0].double().numpy())).float()
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], score, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1).numpy() == clf.predict(test[0].double().numpy())).all()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_class_without_training_images_never_wins(tiny_clip):
    """A class absent from the training labels has no row in scikit-learn's classifier: the probe gives it
    zero weights and a bias of -inf, so no image is ever assigned to it; the others are the fitted rows."""
    train, y = features(2, 4, d=tiny_clip.embed_dim)
    keep = y != 1
    train, y = train[:, keep], y[keep]
    lp = LinearProbe(tiny_clip, CLASSNAMES, search_steps=0, max_iter=50)
    lp.fit(FitData(train, y, train[0], y))
    assert not lp.weight[1].any() and lp.bias[1] == -torch.inf
    assert torch.isfinite(lp.bias[[0, 2, 3]]).all()
    logits = lp(image_features=torch.randn(20, tiny_clip.embed_dim) * 10)
    assert (logits[:, 1] == -torch.inf).all() and (logits.argmax(-1) != 1).all()


def test_linear_probe_arguments_are_checked(tiny_clip):
    """search_steps >= 0 and max_iter >= 1, checked at construction; the training features: one
    un-augmented view per image (lpclip encodes the training images with the test transform)."""
    from promptlab.prompts import FitFeatures

    assert LinearProbe(tiny_clip, CLASSNAMES, search_steps=0, max_iter=1).max_iter == 1
    assert LinearProbe(tiny_clip, CLASSNAMES).fit_features == FitFeatures(views=1, augment=False)
    for kw in ({"search_steps": -1}, {"max_iter": 0}):
        with pytest.raises(ValueError, match=r"search_steps must be >= 0 and max_iter >= 1, got -?\d+, \d+"):
            LinearProbe(tiny_clip, CLASSNAMES, **kw)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_helpers_default_to_lpclip(monkeypatch):
    """Called with their defaults, the helpers fit as lpclip does (linear_probe.py L57/L70/L76, ``--num_step``
    8): ``LogisticRegression(solver="lbfgs", max_iter=1000, C=c)``, 7 coarse fits then 8 rounds of two."""
    import sklearn.linear_model

    from promptlab.methods import linear_probe

    asked = []

    class Recording(sklearn.linear_model.LogisticRegression):
        def __init__(self, **kw):
            asked.append(kw)
            super().__init__(**kw)

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", Recording)
    train, y = features(5, 4)
    linear_probe.fit_logistic(train[0].double().numpy(), y.numpy(), 0.5)
    assert asked == [{"solver": "lbfgs", "max_iter": 1000, "C": 0.5}]

    fits = []

    def recording_fit(x, y, c, max_iter):
        fits.append(max_iter)
        return Recording(max_iter=5, C=c).fit(x, y)  # few iterations: the test needs only the calls

    monkeypatch.setattr(linear_probe, "fit_logistic", recording_fit)
    x, yn = train[0].double().numpy(), y.numpy()
    _, tried = linear_probe.search_c(x, yn, x, yn)
    assert fits == [1000] * (7 + 2 * 8) and len(tried) == 7 + 2 * 8


def test_linear_probe_silences_only_convergence_warnings(monkeypatch):
    """lpclip runs large C unconverged, so a ConvergenceWarning per fit would be noise; any other warning
    scikit-learn raises (about the data, say) still reaches the user."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    from promptlab.methods.linear_probe import fit_logistic

    real_fit = LogisticRegression.fit

    def fit_and_warn(self, x, y):
        warnings.warn("a warning about the data", UserWarning, stacklevel=2)
        return real_fit(self, x, y)

    monkeypatch.setattr(LogisticRegression, "fit", fit_and_warn)
    train, y = features(5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_logistic(train[0].double().numpy(), y.numpy(), 1e6, max_iter=1)  # far from converged
    assert [str(w.message) for w in caught] == ["a warning about the data"]


# ---------------------------------------------------------------------- Tip-Adapter
def ref_cache(train_views, labels):
    """Tip-Adapter utils.py L38-69 build_cache_model: views' raw features averaged, normalised; [D, N], [N, C]."""
    cache_keys = train_views.mean(dim=0)
    cache_keys /= cache_keys.norm(dim=-1, keepdim=True)
    return cache_keys.permute(1, 0), F.one_hot(labels).half()


def ref_search_hp(cfg, cache_keys, cache_values, features, labels, clip_weights, adapter=None):
    """Tip-Adapter utils.py L88-118 search_hp."""
    beta_list = [
        i * (cfg["search_scale"][0] - 0.1) / cfg["search_step"][0] + 0.1 for i in range(cfg["search_step"][0])
    ]
    alpha_list = [
        i * (cfg["search_scale"][1] - 0.1) / cfg["search_step"][1] + 0.1 for i in range(cfg["search_step"][1])
    ]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = adapter(features) if adapter else features @ cache_keys
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            clip_logits = 100.0 * features @ clip_weights
            tip_logits = clip_logits + cache_logits * alpha
            acc = cls_acc(tip_logits, labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc


def ref_tip_logits(features, cache_keys, cache_values, clip_weights, alpha, beta):
    """Tip-Adapter main.py L53-61 (test side of run_tip_adapter)."""
    clip_logits = 100.0 * features @ clip_weights
    affinity = features @ cache_keys
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    return clip_logits + cache_logits * alpha


def _tiny_features(clip, seed, n_per_class, views=1):
    x, y = features(seed, n_per_class, views, d=clip.embed_dim)
    return x, y


def _searching_tip(clip, views):
    """Our Tip-Adapter with the search grid of ``cfg`` below (search_scale [7, 3], search_step [30, 10])."""
    return TipAdapter(
        clip,
        CLASSNAMES,
        template=TEMPLATE,
        views=views,
        search_scale=[7, 3],
        search_steps=[30, 10],
        logit_scale=100.0,
    )


def test_tip_adapter_matches_reference(tiny_clip, ref_openclip):
    cfg = {"search_scale": [7, 3], "search_step": [30, 10]}
    train, y = _tiny_features(tiny_clip, 2, 4, views=3)
    val, yv = _tiny_features(tiny_clip, 2, 6)
    test, _ = _tiny_features(tiny_clip, 2, 5)
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])
    keys, values = ref_cache(train, y)
    beta, alpha, acc = ref_search_hp(cfg, keys, values.float(), norm(val[0]), yv, clip_weights)
    assert alpha > 0 and beta > 0  # the search found something to prefer
    # a beta of the 30-step grid only: a beta grid built with the alpha grid's 10 steps would miss it
    assert all(abs(beta - (i * (7 - 0.1) / 10 + 0.1)) > 1e-6 for i in range(10))

    tip = _searching_tip(tiny_clip, views=3)
    record = tip.fit(FitData(train, y, val[0], yv))
    assert record == {
        "cache_size": 16,
        "alpha": pytest.approx(alpha),
        "beta": pytest.approx(beta),
        "val_accuracy": pytest.approx(acc),
        "beta_grid": [7.0, 30],
        "alpha_grid": [3.0, 10],
    }
    assert (float(tip.alpha), float(tip.beta)) == pytest.approx((alpha, beta))
    torch.testing.assert_close(tip.keys.t(), keys)
    ref = ref_tip_logits(norm(test[0]), keys, values.float(), clip_weights, alpha, beta)
    torch.testing.assert_close(tip(image_features=test[0]), ref, rtol=1e-4, atol=1e-4)


def test_tip_adapter_search_keeps_zero_when_no_cell_is_right(tiny_clip, ref_openclip):
    """search_hp starts from accuracy 0 at beta = alpha = 0 and takes a cell only when it does better:
    on a validation image whose label no cell predicts, the search ends at 0, 0 (and so does ours)."""
    cfg = {"search_scale": [7, 3], "search_step": [30, 10]}
    train, y = _tiny_features(tiny_clip, 3, 4, views=2)
    val, _ = _tiny_features(tiny_clip, 3, 1)
    f = norm(val[0][:1])
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])
    keys, values = ref_cache(train, y)
    never = [
        c
        for c in range(len(CLASSNAMES))
        if ref_search_hp(cfg, keys, values.float(), f, torch.tensor([c]), clip_weights) == (0, 0, 0)
    ]
    assert never, "every class is predicted by some cell: pick other features"
    tip = _searching_tip(tiny_clip, views=2)
    record = tip.fit(FitData(train, y, val[0][:1], torch.tensor([never[0]])))
    assert (record["alpha"], record["beta"], record["val_accuracy"]) == (0.0, 0.0, 0.0)
    assert (float(tip.alpha), float(tip.beta)) == (0.0, 0.0)


def test_tip_adapter_without_search_keeps_its_initial_alpha_beta(tiny_clip):
    """``search: false``: fit builds the cache and keeps init_alpha, init_beta (no grid is searched)."""
    train, y = _tiny_features(tiny_clip, 4, 3, views=2)
    val, yv = _tiny_features(tiny_clip, 4, 2)
    tip = TipAdapter(
        tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, init_alpha=2.5, init_beta=4.0, search=False
    )
    record = tip.fit(FitData(train, y, val[0], yv))
    assert record == {"cache_size": 12, "alpha": 2.5, "beta": 4.0}
    assert (float(tip.alpha), float(tip.beta)) == (2.5, 4.0)
    assert tip.after_train() == {}  # not fine-tuned: nothing to search again


def test_tip_adapter_f_searches_again_with_fp16_keys():
    """Under reference_fp16 the runner casts the fitted keys (a trained parameter) to fp16 after fit();
    after_train's search then mixes them with fp32 validation features: it must search the same grid
    as with the same keys in fp32, not fail on the dtypes."""
    from promptlab.backbones import load_clip

    clip = load_clip("tiny", precision="reference_fp16")
    train, y = _tiny_features(clip, 2, 4, views=2)
    val, yv = _tiny_features(clip, 2, 6)
    tip = TipAdapter(
        clip, CLASSNAMES, template=TEMPLATE, views=2, finetune=True, search_scale=[7, 3], search_steps=[12, 6]
    )
    tip.fit(FitData(train, y, val[0], yv))
    tip.match_backbone_precision()
    assert tip.keys.dtype == torch.float16
    half = tip.after_train()
    with torch.no_grad():
        half_logits = tip(image_features=val[0])  # fp32 features against the fp16 keys
    tip.keys.data = tip.keys.data.float()
    assert half == tip.after_train()
    with torch.no_grad():
        torch.testing.assert_close(half_logits, tip(image_features=val[0]), rtol=0, atol=0)
    assert half["val_accuracy"] > 25  # better than chance on clustered features


def test_tip_adapter_cache_covers_every_class_and_trains_only_under_f(tiny_clip):
    """The cache values are one-hot over all the classes, also when the last class has no training image
    (its column stays zero); the keys are a trained parameter only under Tip-Adapter-F."""
    train, y = _tiny_features(tiny_clip, 5, 2, views=2)
    keep = y < len(CLASSNAMES) - 1
    train, y = train[:, keep], y[keep]
    tip = TipAdapter(tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, search=False)
    tip.fit(FitData(train, y, train[0], y))
    assert tip.values.shape == (len(y), len(CLASSNAMES)) and not tip.values[:, -1].any()
    torch.testing.assert_close(tip.values, F.one_hot(y, len(CLASSNAMES)).float())
    assert tip(image_features=train[0]).shape == (len(y), len(CLASSNAMES))
    assert not tip.keys.requires_grad and tip.trainable_parameters() == []
    tip_f = TipAdapter(tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, finetune=True)
    # restored, not fitted here: no validation features to search on
    assert tip_f.after_train() == {"alpha": pytest.approx(1.17), "beta": 1.0}
    tip_f.fit(FitData(train, y, train[0], y))
    assert tip_f.keys.requires_grad and tip_f.trainable_parameters() == [tip_f.keys]
    with pytest.raises(ValueError, match="views must be >= 1, got 0"):
        TipAdapter(tiny_clip, CLASSNAMES, template=TEMPLATE, views=0)


def test_tip_logits_compute_in_the_features_dtype(tiny_clip):
    """``tip_logits`` takes the text classifier, keys and values to the features' dtype: fp16 features
    (the reference's fp16 pipeline, main.py L53-61) give fp16 logits, those of fp32 up to fp16 rounding."""
    train, y = _tiny_features(tiny_clip, 6, 3, views=2)
    test, _ = _tiny_features(tiny_clip, 6, 2)
    tip = TipAdapter(tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, search=False, logit_scale=100.0)
    tip.fit(FitData(train, y, train[0], y))
    f = F.normalize(test[0], dim=-1)
    with torch.no_grad():
        full, half = tip.tip_logits(f, 1.17, 2.0), tip.tip_logits(f.half(), 1.17, 2.0)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=1e-2, atol=0.1)


def test_tip_adapter_f_step_matches_reference(tiny_clip, ref_openclip):
    """One Tip-Adapter-F step (main.py L44-80): the adapter Linear initialised with the keys, CE on the tip
    logits with the initial alpha, beta, AdamW(eps=1e-4) under CosineAnnealingLR per iteration."""
    train, y = _tiny_features(tiny_clip, 2, 4, views=2)
    batch = F.normalize(train[1], dim=-1)
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])
    keys, values = ref_cache(train, y)
    adapter = nn.Linear(keys.shape[0], keys.shape[1], bias=False)
    adapter.weight = nn.Parameter(keys.t().clone())
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.001, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3)
    beta, alpha = 1.0, 1.17
    ref_lrs = []
    for _ in range(3):
        ref_lrs.append(scheduler.get_last_lr()[0])
        affinity = adapter(batch)
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values.float()
        tip_logits = 100.0 * batch @ clip_weights + cache_logits * alpha
        loss = F.cross_entropy(tip_logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    tip = TipAdapter(tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, finetune=True, logit_scale=100.0)
    tip.fit(FitData(train, y, train[0], y))
    ours = torch.optim.AdamW(tip.trainable_parameters(), lr=0.001, eps=1e-4)
    schedule = make_schedule("cosine", base_lr=0.001, epochs=3, batches_per_epoch=1, warmup_epochs=0)
    for k in range(3):
        assert schedule(k) == pytest.approx(ref_lrs[k])
        for group in ours.param_groups:
            group["lr"] = schedule(k)
        loss = tip.loss(tip(image_features=train[1]), y)
        ours.zero_grad()
        loss.backward()
        ours.step()
    torch.testing.assert_close(tip.keys, adapter.weight, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- GDA
def ref_ks(vecs, labels, n_classes):
    """mrflogs/ICLR24 main_few_shots.py L53-63: class means, the KS-shrunk shared precision -> W [D, C], b [C]."""
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(n_classes)])
    center_vecs = torch.cat([vecs[labels == i] - mus[i].unsqueeze(0) for i in range(n_classes)])
    cov_inv = center_vecs.shape[1] * torch.linalg.pinv(
        (center_vecs.shape[0] - 1) * center_vecs.T.cov()
        + center_vecs.T.cov().trace() * torch.eye(center_vecs.shape[1], dtype=vecs.dtype)
    )
    ps = torch.ones(n_classes, dtype=vecs.dtype) * 1.0 / n_classes
    W = torch.einsum("nd, dc -> cn", mus, cov_inv)
    b = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    return W, b


def ref_class_mean(vecs, labels, n_classes):
    """mrflogs/ICLR24 main_base2new.py L55-61: the pinv of the mean per-class covariance, no shrinkage."""
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(n_classes)])
    train_cov = torch.cat([vecs[labels == i].T.cov().unsqueeze(0) for i in range(n_classes)])
    cov_inv = torch.linalg.pinv(train_cov.mean(dim=0))
    ps = torch.ones(n_classes) * 1.0 / n_classes
    W = torch.einsum("nd, dc -> cn", mus, cov_inv)
    b = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    return W, b


def ref_alpha_search(W, b, clip_weights, val_features, val_labels):
    """main_few_shots.py L65-74 (main_base2new.py L64-73 is the same): the first best alpha of the grid,
    starting from accuracy 0 at alpha 0.1. Also returns the best accuracy and every (alpha, accuracy)."""
    best_val_acc, best_alpha, tried = 0, 0.1, []
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        val_logits = 100.0 * val_features.float() @ clip_weights.float() + alpha * (
            val_features.float() @ W + b
        )
        acc = cls_acc(val_logits, val_labels)
        tried.append((alpha, acc))
        if acc > best_val_acc:
            best_val_acc, best_alpha = acc, alpha
    return best_alpha, best_val_acc, tried


def ref_gda(vecs, labels, clip_weights, val_features, val_labels, n_classes):
    """mrflogs/ICLR24 main_few_shots.py L53-77: the KS discriminant, alpha on val."""
    W, b = ref_ks(vecs, labels, n_classes)
    return (W, b, *ref_alpha_search(W, b, clip_weights, val_features, val_labels))


def test_gda_matches_reference(tiny_clip, ref_openclip):
    train, y = _tiny_features(tiny_clip, 3, 6, views=3)
    val, yv = _tiny_features(tiny_clip, 3, 3)
    test, _ = _tiny_features(tiny_clip, 3, 5)
    vecs, labels = ref_samples(train, y)
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])
    W, b, alpha, acc, tried = ref_gda(vecs, labels, clip_weights, norm(val[0]), yv, len(CLASSNAMES))

    gda = GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, views=3, logit_scale=100.0)
    record = gda.fit(FitData(train, y, val[0], yv))
    assert record["alpha"] == alpha and record["val_accuracy"] == pytest.approx(acc)
    # every alpha tried, in the reference's order, with its validation accuracy
    assert record["search"] == [{"alpha": a, "val_accuracy": pytest.approx(v)} for a, v in tried]
    assert len({v for _, v in tried}) > 1  # the accuracies differ across the grid: the comparison counts
    torch.testing.assert_close(gda.weight, W.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gda.bias, b, rtol=1e-4, atol=1e-3)
    ref = 100.0 * norm(test[0]) @ clip_weights + alpha * (norm(test[0]) @ W + b)  # L76
    torch.testing.assert_close(gda(image_features=test[0]), ref, rtol=1e-4, atol=1e-3)


def ref_new_classes(vecs, clip_weights_new, k=64, center="text"):
    """mrflogs/ICLR24 main_base2new.py L83-111: each new class's mean from the k base samples nearest its
    text embedding w and 16 copies of w; the mean of the KS-shrunk precisions of the neighbours' scatter
    around w. The KS factor and identity are the feature width D where L101/L104 write 512 (ViT-B/16's D).
    ``center="mean"`` is promptlab's variant: ``covariance(..., mu=)`` given the class's synthesised mean
    instead of w (the reference's own helper, another argument)."""
    d = vecs.shape[1]
    mu = torch.cat(
        [
            torch.cat(
                [vecs[torch.topk(w @ vecs.T, k=k, largest=True)[1]], w.unsqueeze(0).repeat(16, 1)]
            ).mean(dim=0, keepdim=True)
            for w in clip_weights_new.T
        ]
    )

    def covariance(vecs, mu=0):
        N, D = vecs.shape
        return (vecs - mu).T @ (vecs - mu) / (N - 1)

    around = [w.unsqueeze(0) if center == "text" else mu[i : i + 1] for i, w in enumerate(clip_weights_new.T)]
    cov_inv = torch.cat(
        [
            d
            * torch.linalg.pinv(
                (k - 1) * covariance(vecs[torch.topk(w @ vecs.T, k=k, largest=True)[1]], mu=around[i])
                + covariance(vecs[torch.topk(w @ vecs.T, k=k, largest=True)[1]], mu=around[i]).trace()
                * torch.eye(d, dtype=vecs.dtype)
            ).unsqueeze(0)
            for i, w in enumerate(clip_weights_new.T)
        ]
    ).mean(dim=0)
    ps = torch.ones(clip_weights_new.shape[1], dtype=vecs.dtype) * 1.0 / clip_weights_new.shape[1]
    W_new = torch.einsum("nd, dc -> cn", mu, cov_inv)
    b_new = ps.log() - torch.einsum("nd, dc, nc -> n", mu, cov_inv, mu) / 2
    return W_new, b_new


def ref_gda_base2new(vecs, labels, clip_weights, clip_weights_new, val_features, val_labels):
    """mrflogs/ICLR24 main_base2new.py L54-111 as it runs: the base half's class-mean discriminant (L55-61),
    alpha on the base validation features (L65-76), then the new half's synthesised classifier (L85-111)."""
    W, b = ref_class_mean(vecs, labels, clip_weights.shape[1])
    best_alpha = ref_alpha_search(W, b, clip_weights, val_features, val_labels)[0]
    W_new, b_new = ref_new_classes(vecs, clip_weights_new)
    return W, b, best_alpha, W_new, b_new


NEW_CLASSNAMES = ["airliner", "fire_truck", "tabby cat"]


def _gda_base2new_data(clip, ref_openclip, views):
    """Base training/validation features of CLASSNAMES, their reference samples (main_base2new.py
    L42-53), and the new classes' text classifier (L170)."""
    train, y = _tiny_features(clip, 4, 6, views=views)
    val, yv = _tiny_features(clip, 4, 3)
    vecs, labels = ref_samples(train, y)
    return train, y, val, yv, vecs, labels, ref_clip_classifier(ref_openclip, NEW_CLASSNAMES, [TEMPLATE])


def test_gda_base2new_matches_reference(tiny_clip, ref_openclip, caplog):
    # 4 classes x 6 images x 3 views: 72 samples, more than the 64 neighbours
    train, y, val, yv, vecs, labels, clip_weights_new = _gda_base2new_data(tiny_clip, ref_openclip, views=3)
    test_new = torch.randn(10, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(9))
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])  # L163
    W, b, alpha, W_new, b_new = ref_gda_base2new(
        vecs, labels, clip_weights, clip_weights_new, norm(val[0]), yv
    )

    everything = CLASSNAMES[:2] + NEW_CLASSNAMES + CLASSNAMES[2:]  # rows follow the dataset's order
    gda = GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, all_classnames=everything, views=3, logit_scale=100.0)
    with caplog.at_level(logging.WARNING, logger="promptlab.methods.gda"):
        record = gda.fit(FitData(train, y, val[0], yv))
    assert not caplog.records  # 72 samples: 64 neighbours as asked, nothing to warn about
    assert record["alpha"] == alpha and record["estimator"] == "class_mean"
    assert record["new_classes"] == {"n": 3, "knn": 64, "text_copies": 16, "center": "text"}
    torch.testing.assert_close(gda.weight[gda._row], W.t(), rtol=1e-4, atol=1e-4)  # the fitted classifier
    torch.testing.assert_close(gda.bias[gda._row], b, rtol=1e-4, atol=1e-3)
    gda.set_classnames(NEW_CLASSNAMES)  # subsample=new
    torch.testing.assert_close(gda.weight[gda._row], W_new.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gda.bias[gda._row], b_new, rtol=1e-4, atol=1e-3)
    ref = 100.0 * norm(test_new) @ clip_weights_new + alpha * (norm(test_new) @ W_new + b_new)  # L113
    torch.testing.assert_close(gda(image_features=test_new), ref, rtol=1e-4, atol=1e-3)
    zero_shot = 100.0 * norm(test_new) @ clip_weights_new
    assert (ref - zero_shot).abs().max() > 1e-2  # the synthesised classifier counts in what was compared


def test_gda_estimator_and_knn_center_options_match_reference(tiny_clip, ref_openclip):
    """The options that change the reference's protocol choice: ``estimator`` fixed (not ``auto``) uses the
    estimator asked for whatever the protocol, and ``knn_center="mean"`` centres each new class's scatter on
    its synthesised mean (the new classes' rows differ from the reference's text-centred ones)."""
    train, y, val, yv, vecs, labels, clip_weights_new = _gda_base2new_data(tiny_clip, ref_openclip, views=3)
    everything = CLASSNAMES + NEW_CLASSNAMES
    n = len(CLASSNAMES)

    few_shot = GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, views=3, estimator="class_mean", search=False)
    assert few_shot.fit(FitData(train, y, val[0], yv))["estimator"] == "class_mean"
    W, b = ref_class_mean(vecs, labels, n)
    torch.testing.assert_close(few_shot.weight, W.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(few_shot.bias, b, rtol=1e-4, atol=1e-3)

    ks = GDA(
        tiny_clip,
        CLASSNAMES,
        template=TEMPLATE,
        all_classnames=everything,
        views=3,
        estimator="ks",
        search=False,
    )
    assert ks.fit(FitData(train, y, val[0], yv))["estimator"] == "ks"
    W, b = ref_ks(vecs, labels, n)
    torch.testing.assert_close(ks.weight[:n], W.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ks.bias[:n], b, rtol=1e-4, atol=1e-3)

    centred = GDA(
        tiny_clip,
        CLASSNAMES,
        template=TEMPLATE,
        all_classnames=everything,
        views=3,
        knn_center="mean",
        search=False,
    )
    assert centred.fit(FitData(train, y, val[0], yv))["new_classes"]["center"] == "mean"
    W_new, b_new = ref_new_classes(vecs, clip_weights_new, center="mean")
    torch.testing.assert_close(centred.weight[n:], W_new.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(centred.bias[n:], b_new, rtol=1e-4, atol=1e-3)
    W_text, _ = ref_new_classes(vecs, clip_weights_new, center="text")
    assert (W_new - W_text).abs().max() > 1e-2  # the centre changes the rows compared


def test_gda_with_fewer_samples_than_knn_uses_them_all_and_says_so(tiny_clip, ref_openclip, caplog):
    """24 base samples for knn=64 neighbours: every sample is a neighbour (k = 24 in the reference's
    formulas), the record says k, and a warning names both numbers."""
    train, y, val, yv, vecs, labels, clip_weights_new = _gda_base2new_data(tiny_clip, ref_openclip, views=1)
    gda = GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, all_classnames=CLASSNAMES + NEW_CLASSNAMES, views=1)
    with caplog.at_level(logging.WARNING, logger="promptlab.methods.gda"):
        record = gda.fit(FitData(train, y, val[0], yv))
    assert record["new_classes"]["knn"] == 24
    assert [r.getMessage() for r in caplog.records] == ["GDA: knn=64 but only 24 training samples: using 24"]
    W_new, b_new = ref_new_classes(vecs, clip_weights_new, k=24)
    torch.testing.assert_close(gda.weight[len(CLASSNAMES) :], W_new.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gda.bias[len(CLASSNAMES) :], b_new, rtol=1e-4, atol=1e-3)


def test_gda_classifiers_keep_float64(tiny_clip, ref_openclip):
    """The discriminant helpers compute in their input's dtype: float64 in, the reference's float64
    numbers out (a float32 prior, identity or precision accumulator would cost ~1e-7 here). Called with
    their defaults: the KS estimator and text-centred neighbours, the reference's."""
    *_, vecs, labels, clip_weights_new = _gda_base2new_data(tiny_clip, ref_openclip, views=3)
    vecs, text = vecs.double(), clip_weights_new.t().double()
    W, b = gaussian_classifier(vecs, labels, len(CLASSNAMES))
    W_ref, b_ref = ref_ks(vecs, labels, len(CLASSNAMES))
    assert W.dtype == b.dtype == torch.float64
    torch.testing.assert_close(W, W_ref.t(), rtol=1e-11, atol=1e-10)
    torch.testing.assert_close(b, b_ref, rtol=1e-11, atol=1e-10)
    W, b = synthesized_classifier(vecs, text, 40, 16)
    W_ref, b_ref = ref_new_classes(vecs, text.t(), k=40)
    assert W.dtype == b.dtype == torch.float64
    torch.testing.assert_close(W, W_ref.t(), rtol=1e-11, atol=1e-10)
    torch.testing.assert_close(b, b_ref, rtol=1e-11, atol=1e-10)


def test_gda_search_with_no_right_alpha_keeps_the_fallback(tiny_clip, ref_openclip):
    """main_few_shots.py L68-74 starts from accuracy 0 and alpha 0.1 and takes an alpha only when it does
    better: on a validation image whose label no alpha predicts, alpha stays 0.1 at accuracy 0."""
    train, y = _tiny_features(tiny_clip, 3, 6, views=2)
    val, _ = _tiny_features(tiny_clip, 3, 1)
    vecs, labels = ref_samples(train, y)
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])
    W, b = ref_ks(vecs, labels, len(CLASSNAMES))
    f = norm(val[0][:1])
    never = [
        c
        for c in range(len(CLASSNAMES))
        if ref_alpha_search(W, b, clip_weights, f, torch.tensor([c]))[:2] == (0.1, 0)
    ]
    assert never, "every class is predicted by some alpha: pick other features"
    gda = GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, logit_scale=100.0)
    record = gda.fit(FitData(train, y, val[0][:1], torch.tensor([never[0]])))
    assert (record["alpha"], record["val_accuracy"]) == (0.1, 0.0)
    assert float(gda.mix) == pytest.approx(0.1)


def test_gda_without_search_keeps_its_alpha(tiny_clip, ref_openclip):
    """``search: false``: the discriminant is fitted and the logits use the ``alpha`` given."""
    train, y = _tiny_features(tiny_clip, 3, 6, views=2)
    test, _ = _tiny_features(tiny_clip, 3, 2)
    vecs, labels = ref_samples(train, y)
    gda = GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, views=2, alpha=0.5, search=False, logit_scale=100.0)
    assert gda.fit(FitData(train, y, train[0], y)) == {"alpha": 0.5, "estimator": "ks"}
    W, b = ref_ks(vecs, labels, len(CLASSNAMES))
    clip_weights = ref_clip_classifier(ref_openclip, CLASSNAMES, [TEMPLATE])
    ref = 100.0 * norm(test[0]) @ clip_weights + 0.5 * (norm(test[0]) @ W + b)
    torch.testing.assert_close(gda(image_features=test[0]), ref, rtol=1e-4, atol=1e-3)


def test_gda_arguments_and_rows_are_checked(tiny_clip):
    """Bad arguments fail at construction with the value named; the rows are looked up by name, once each."""
    from promptlab.prompts import FitFeatures

    def build(**kw):
        return GDA(tiny_clip, CLASSNAMES, template=TEMPLATE, **kw)

    assert build(views=1, knn=2, text_copies=0).fit_features == FitFeatures(views=1, augment=True)
    assert build(views=3).fit_features == FitFeatures(views=3, augment=True)
    with pytest.raises(ValueError, match="views must be >= 1, got 0"):
        build(views=0)
    for kw in ({"estimator": "lda"}, {"knn_center": "median"}):
        with pytest.raises(ValueError, match="expected one of"):
            build(**kw)
    for kw in ({"knn": 1}, {"text_copies": -1}):
        with pytest.raises(ValueError, match=r"knn=\d+ \(at least 2\), text_copies=-?\d+ \(at least 0\)"):
            build(**kw)
    others = [f"class{i}" for i in range(6)]
    with pytest.raises(
        ValueError, match=r"lacks the training classes \['cat', 'class0', 'class1', 'class2', 'class3'\]$"
    ):
        GDA(tiny_clip, ["cat"] + others, template=TEMPLATE, all_classnames=["dog"])
    rows = CLASSNAMES + NEW_CLASSNAMES
    gda = build(all_classnames=rows)
    assert gda.can_serve(rows, CLASSNAMES) and gda.can_serve(NEW_CLASSNAMES, CLASSNAMES)
    assert not gda.can_serve(["dog"], CLASSNAMES)
    twice = GDA(tiny_clip, ["sea_lion"], template=TEMPLATE, all_classnames=["cat", "sea_lion", "cat"])
    with pytest.raises(ValueError, match=r"name \['cat'\] more than once"):
        twice.set_classnames(["sea_lion", "cat"])
    many = [f"c{i}" for i in range(7)]
    doubled = GDA(tiny_clip, ["x"], template=TEMPLATE, all_classnames=["x"] + many + many)
    with pytest.raises(ValueError, match=r"name \['c0', 'c1', 'c2', 'c3', 'c4'\] more than once"):
        doubled.set_classnames(many[::-1])


# ---------------------------------------------------------------------- CLIP-Adapter
class RefAdapter(nn.Module):
    """gaopengcuhk/CLIP-Adapter clip_adapter.py L55-67."""

    def __init__(self, c_in, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(c_in, c_in // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(c_in // reduction, c_in, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.fc(x)


def ref_clip_adapter_logits(model, adapter, images, classnames, template):
    """clip_adapter.py L79-86 (TextEncoder) and L100-115 (CustomCLIP.forward)."""
    image_features = model.visual(images)
    x = adapter(image_features)
    ratio = 0.2
    image_features = ratio * x + (1 - ratio) * image_features
    prompts = torch.cat([open_clip.tokenize(template.format(c.replace("_", " "))) for c in classnames])
    text_features = model.encode_text(prompts)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


def test_clip_adapter_matches_reference(tiny_clip, ref_openclip, images):
    torch.manual_seed(0)
    ours = CLIPAdapter(tiny_clip, CLASSNAMES, template=TEMPLATE)
    ref = RefAdapter(tiny_clip.embed_dim, 4)
    ref.load_state_dict(
        {"fc." + k.removeprefix("adapter."): v.clone() for k, v in ours.prompt_state_dict().items()}
    )
    with torch.no_grad():  # the adapter's output is not zero at init (random Linear layers)
        ours.adapter[2].weight.mul_(3.0)
        ref.fc[2].weight.mul_(3.0)
    labels = torch.arange(images.shape[0]) % len(CLASSNAMES)
    logits = ours(images)
    expected = ref_clip_adapter_logits(ref_openclip, ref, images, CLASSNAMES, TEMPLATE)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    F.cross_entropy(logits, labels).backward()
    F.cross_entropy(expected, labels).backward()
    for (name, p), q in zip(ours.adapter.named_parameters(), ref.fc.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_clip_adapter_reduction_range(tiny_clip):
    """reduction r from 1 (no bottleneck) to D (a bottleneck of width 1); outside, a clear error."""
    d = tiny_clip.embed_dim
    for r, width in ((1, d), (d, 1), (3, d // 3)):
        adapter = CLIPAdapter(tiny_clip, CLASSNAMES, reduction=r, template=TEMPLATE).adapter
        assert adapter[0].weight.shape == (width, d) and adapter[2].weight.shape == (d, width)
    for r in (0, d + 1):
        with pytest.raises(ValueError, match=rf"reduction={r}: expected 1..{d} for embedding width {d}"):
            CLIPAdapter(tiny_clip, CLASSNAMES, reduction=r, template=TEMPLATE)


def test_cosine_schedule_is_torch_cosine_annealing():
    """Tip-Adapter-F / CLIP-LoRA: CosineAnnealingLR(T_max = all iterations, eta_min) stepped per iteration."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, eta_min=1e-6)
    ours = make_schedule(
        "cosine",
        base_lr=2e-4,
        epochs=99,
        batches_per_epoch=7,
        max_steps=10,
        min_lr_ratio=1e-6 / 2e-4,
        warmup_epochs=0,
    )
    for k in range(10):
        assert ours(k) == pytest.approx(sched.get_last_lr()[0], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert math.isclose(ours(10), 1e-6)
