"""The training-free contract: ``PromptModule.fit_features`` / ``fit`` / ``after_train`` / ``fitted_state``,
called by the runner for any method that declares them, and the engine's step budget (``max_steps``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from promptlab.cli import main
from promptlab.engine import FeatureBatches, make_schedule, train
from promptlab.export import load_prompts, save_prompts
from promptlab.methods import GDA, CLIPAdapter, LinearProbe, TipAdapter
from promptlab.methods.gda import shrunk_precision, synthesized_classifier
from promptlab.prompts import FitData, FitFeatures

CLASSES = ["a", "b", "c"]


def _run(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "run"
    args = ["run", "demo/coop_tiny", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", *overrides]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_runner_fits_from_the_features_the_method_asks_for(tmp_path, monkeypatch):
    seen: list[FitData] = []
    real_fit = TipAdapter.fit

    def spy(self, data):
        seen.append(data)
        return real_fit(self, data)

    monkeypatch.setattr(TipAdapter, "fit", spy)
    metrics = _run(
        tmp_path,
        "method={_component_: promptlab.methods.TipAdapter, views: 3, search_steps: [4, 3]}",
        "optimizer=null",
        "train.epochs=0",
    )
    assert len(seen) == 1  # once, before evaluation
    data = seen[0]
    n_train = 6 * 4  # synthetic: 6 classes x shots=4
    assert data.train.shape[:2] == (3, n_train) and data.train_labels.shape == (n_train,)
    assert not torch.equal(data.train[0], data.train[1])  # augmented views differ
    assert data.val.shape[0] == data.val_labels.shape[0] > 0 and data.val_split == "val"
    fit = metrics["train"]["fit"]
    assert fit["val_split"] == "val" and fit["cache_size"] == n_train and {"alpha", "beta"} <= set(fit)


def test_runner_calls_after_train_and_records_it(tmp_path):
    metrics = _run(
        tmp_path,
        "method={_component_: promptlab.methods.TipAdapter, views: 2, search_steps: [4, 3], finetune: true}",
        "optimizer={_component_: torch.optim.AdamW, lr: 0.01, eps: 1.0e-4}",
        "train.epochs=2",
        "train.lr_schedule=cosine",
        "train.warmup_epochs=0",
    )
    assert metrics["train"]["epochs"] == 2 and "last_loss" in metrics["train"]
    assert {"alpha", "beta", "val_accuracy"} <= set(metrics["train"]["after"])  # searched after training


def test_unaugmented_fit_uses_the_evaluation_transform(tmp_path, monkeypatch, tiny_clip):
    assert LinearProbe(tiny_clip, CLASSES).fit_features == FitFeatures(views=1, augment=False)
    seen: list[FitData] = []
    monkeypatch.setattr(LinearProbe, "fit", lambda self, data: seen.append(data) or {})
    import promptlab.tasks as tasks

    transforms = {}
    real = tasks.cached_features

    def spy(encode, items, transform, **kw):
        transforms[kw["desc"]] = repr(transform)
        return real(encode, items, transform, **kw)

    monkeypatch.setattr(tasks, "cached_features", spy)
    _run(tmp_path, "method={_component_: promptlab.methods.LinearProbe}", "optimizer=null", "train.epochs=0")
    assert seen[0].train.shape[0] == 1
    assert transforms["fit features"] == transforms["val features"] == repr(tiny_clip.eval_transform)
    assert LinearProbe.fit_features is None  # the class default: no fit; the instance asks for one


def test_fitted_state_of_another_shape_loads_back(tmp_path, tiny_clip):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(2, 9, tiny_clip.embed_dim, generator=g)
    labels = torch.arange(9) % 3
    tip = TipAdapter(tiny_clip, CLASSES, views=2, search_steps=[5, 3])
    tip.fit(FitData(train, labels, train[0], labels))
    assert tip.keys.shape == (9, tiny_clip.embed_dim)
    save_prompts(tip, tmp_path / "p")
    loaded = load_prompts(tmp_path / "p", tiny_clip)  # built empty, the cache takes the saved shape
    x = torch.randn(4, tiny_clip.embed_dim, generator=g)
    torch.testing.assert_close(loaded(image_features=x), tip(image_features=x))
    assert float(loaded.alpha) == float(tip.alpha) and float(loaded.beta) == float(tip.beta)
    with pytest.raises(ValueError, match="cannot serve"):  # the cache's values belong to its classes
        loaded.set_classnames(["x", "y", "z"])


def test_gda_fitted_on_a_base_half_serves_the_new_half_after_export(tmp_path, tiny_clip):
    """Base-to-new: one fit covers every class of ``all_classnames``; the export carries those rows and the
    loaded module serves the new half (``subsample=new``), never names outside the dataset."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn(2, 12, tiny_clip.embed_dim, generator=g)
    labels = torch.arange(12) % 3
    everything = ["d", *CLASSES, "e"]
    gda = GDA(tiny_clip, CLASSES, all_classnames=everything, views=2, knn=8)
    record = gda.fit(FitData(train, labels, train[0], labels))
    assert record["estimator"] == "class_mean" and record["new_classes"]["n"] == 2
    assert gda.weight.shape == (5, tiny_clip.embed_dim) and bool(gda.weight[[0, 4]].abs().sum(-1).all())
    save_prompts(gda, tmp_path / "p")
    loaded = load_prompts(tmp_path / "p", tiny_clip, classnames=["e", "d"])  # any order of served names
    x = torch.randn(4, tiny_clip.embed_dim, generator=g)
    gda.set_classnames(["e", "d"])
    torch.testing.assert_close(loaded(image_features=x), gda(image_features=x))
    with pytest.raises(ValueError, match="cannot serve"):
        loaded.set_classnames(["e", "x"])
    few_shot = GDA(tiny_clip, CLASSES, all_classnames=CLASSES, views=2)  # all classes: the few-shot fit
    assert few_shot.fit(FitData(train, labels, train[0], labels))["estimator"] == "ks"


def test_gda_knn_center_mean_takes_the_neighbours_own_scatter(tiny_clip):
    """``knn_center="mean"`` (the option beside the reference's "text"): with no text copies in the mean,
    a new class's precision is the shrunk inverse of its neighbours' sample covariance."""
    g = torch.Generator().manual_seed(1)
    vecs = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(1, 8, generator=g), dim=-1)
    nbrs = vecs[(text @ vecs.t()).topk(10).indices[0]]
    mu = nbrs.mean(0, keepdim=True)
    expected = mu @ shrunk_precision(torch.cov(nbrs.t()), 10)
    w, _ = synthesized_classifier(vecs, text, knn=10, text_copies=0, center="mean")
    torch.testing.assert_close(w, expected)
    w_text, _ = synthesized_classifier(vecs, text, knn=10, text_copies=0, center="text")
    assert (w_text - expected).abs().max() > 1e-3  # the reference's centring differs


def test_shapes_outside_fitted_state_are_still_checked(tiny_clip):
    a = CLIPAdapter(tiny_clip, CLASSES)
    state = {k: v[:1] for k, v in a.prompt_state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        a.load_prompt_state_dict(state)


def test_max_steps_ends_the_run_inside_an_epoch(tmp_path, tiny_clip):
    torch.manual_seed(0)
    module = CLIPAdapter(tiny_clip, CLASSES)
    feats, labels = torch.randn(1, 12, tiny_clip.embed_dim), torch.arange(12) % 3
    g = torch.Generator().manual_seed(0)
    batches = FeatureBatches(feats, labels, 2, g)  # 6 batches per epoch
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
    steps = []
    schedule = make_schedule(
        "cosine", base_lr=0.1, epochs=3, batches_per_epoch=6, warmup_epochs=0, max_steps=8
    )
    real_step = opt.step
    opt.step = lambda *a, **k: steps.append(opt.param_groups[0]["lr"]) or real_step(*a, **k)
    result = train(
        module,
        batches,
        opt,
        epochs=2,
        lr_schedule=schedule,
        generator=g,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        max_steps=8,
    )
    assert len(steps) == 8  # 6 in the first epoch, 2 in the second
    assert steps == pytest.approx([schedule(k) for k in range(8)])
    assert result.epochs_run == 2 and (tmp_path / "checkpoints" / "last.pt").exists()
