"""The training loop: schedule, determinism, resume, NaN handling, feature cache, evaluation."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from promptlab.backbones import load_clip
from promptlab.data import ImageDataset, load_dataset, make_synthetic_dataset
from promptlab.engine import FeatureBatches, ImageBatches, evaluate, lr_at, make_schedule, per_epoch, train
from promptlab.features import cached_features, encode_items, view_seed
from promptlab.methods import CoOp


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root)
    return load_dataset("synthetic", root)


def _dassl_lrs(base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> list[float]:
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR, replayed with torch's own scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    opt.step()  # silence the scheduler-order warning; no gradient, so nothing moves
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs, last_epoch = [], 0
    for _ in range(epochs):
        lrs.append(warmup_lr if last_epoch < warmup_epochs else opt.param_groups[0]["lr"])
        if last_epoch >= warmup_epochs:
            successor.step()
        last_epoch += 1
    return lrs


@pytest.mark.parametrize("epochs,warmup", [(10, 1), (50, 1), (7, 0), (20, 3)])
def test_lr_schedule_matches_dassl(epochs, warmup):
    ours = [lr_at(e, 0.002, epochs, warmup, 1e-5) for e in range(epochs)]
    assert ours == pytest.approx(_dassl_lrs(0.002, epochs, warmup, 1e-5), rel=1e-9, abs=1e-12)


def test_linear_warmup_rises_to_base():
    lrs = [lr_at(e, 1.0, 10, 4, 0.0, "linear") for e in range(5)]
    assert lrs[:4] == pytest.approx([0, 0.25, 0.5, 0.75]) and lrs[4] == pytest.approx(1.0)
    assert math.isclose(lr_at(4, 1.0, 10, 4, 0.0, "linear"), 1.0)
    # from a non-zero warm-up lr: warmup_lr + (base - warmup_lr) * e / warmup_epochs
    assert [lr_at(e, 1.0, 10, 4, 0.2, "linear") for e in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_lr_at_defaults_are_no_warmup_then_coops_constant_one():
    """lr_at without warm-up arguments is the bare cosine; with warm-up epochs only, CoOp's constant 1e-5,
    and the cosine then restarts from the base lr (Dassl's hand-over)."""
    assert lr_at(0, 0.002, 10) == 0.002 and lr_at(5, 0.002, 10) == pytest.approx(0.001)
    assert lr_at(0, 0.002, 10, 1) == 1e-5 and lr_at(1, 0.002, 10, 1) == 0.002
    assert lr_at(2, 0.002, 10, 1) == pytest.approx(0.001 * (1 + math.cos(math.pi / 10)))


def _vificlip_reference_lrs(
    base_lr: float, epochs: int, warmup_epochs: int, n_iter: int, accum: int
) -> list[float]:
    """The lr of every optimizer step of a ViFi-CLIP run, replayed with timm's own scheduler.

    muzairkhattak/ViFi-CLIP utils/optimizer.py build_scheduler (L50-64): CosineLRScheduler(t_initial=
    int(EPOCHS * n_iter_per_epoch), lr_min=LR / 100, warmup_lr_init=0, warmup_t=int(WARMUP_EPOCHS *
    n_iter_per_epoch), cycle_limit=1, t_in_epochs=False) with n_iter_per_epoch = len(train_loader);
    main.py train_one_epoch (L137-157): the optimizer steps every ACCUMULATION_STEPS batches (the
    epoch's leftover batches never step: zero_grad at the next epoch's start) and each step is followed
    by lr_scheduler.step_update(epoch * num_steps + idx).
    """
    from timm.scheduler.cosine_lr import CosineLRScheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = CosineLRScheduler(
        opt,
        t_initial=int(epochs * n_iter),
        lr_min=base_lr / 100,
        warmup_lr_init=0,
        warmup_t=int(warmup_epochs * n_iter),
        cycle_limit=1,
        t_in_epochs=False,
    )
    lrs = []
    for epoch in range(epochs):
        for idx in range(n_iter):
            if accum == 1 or (idx + 1) % accum == 0:
                lrs.append(opt.param_groups[0]["lr"])  # optimizer.step() runs at this lr
                sched.step_update(epoch * n_iter + idx)
    return lrs


def _recording_sgd(params, lr: float) -> tuple[torch.optim.Optimizer, list[float]]:
    """An SGD whose step() records the lr it runs at (every group's must agree)."""
    opt, seen = torch.optim.SGD(params, lr=lr), []
    plain_step = opt.step

    def step(*a, **kw):
        lrs = {g["lr"] for g in opt.param_groups}
        assert len(lrs) == 1
        seen.append(lrs.pop())
        return plain_step(*a, **kw)

    opt.step = step
    return opt, seen


def _train_lrs(clip, tmp_path, kind, *, epochs, warmup, n_batches, accum, drop, base_lr=8e-6, **kw):
    """Train a tiny CoOp through the engine with ``make_schedule(kind, ...)``; the lr of each step."""
    torch.manual_seed(0)
    module = CoOp(clip, ["red circle", "blue square", "green star"], n_ctx=2)
    feats, labels = _features(n=2 * n_batches, d=clip.embed_dim)
    g = torch.Generator().manual_seed(1)
    batches = FeatureBatches(feats, labels, 2, g)
    opt, seen = _recording_sgd(module.trainable_parameters(), base_lr)
    schedule = make_schedule(
        kind,
        base_lr=base_lr,
        epochs=epochs,
        batches_per_epoch=len(batches),
        accum=accum,
        drop_partial=drop,
        warmup_epochs=warmup,
        warmup_lr=0.0 if kind == "timm_cosine" else 1e-5,
        warmup_type="linear" if kind == "timm_cosine" else "constant",
        min_lr_ratio=0.01 if kind == "timm_cosine" else 0.0,
    )
    train(
        module,
        kw.pop("wrap", lambda b: b)(batches),
        opt,
        epochs=epochs,
        lr_schedule=schedule,
        generator=g,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        grad_accum_steps=accum,
        drop_partial_accum=drop,
        **kw,
    )
    return module, seen


# (epochs, warm-up epochs, batches per epoch, accumulation): ViFi-CLIP base-to-novel on HMDB
# (11 / 5 epochs, 416 clips / 32 per iteration = 13 iterations, accumulation 2, a leftover batch each
# epoch), its K400 bridge shape (10 / 5, accumulation 8) and a plain per-iteration run.
@pytest.mark.parametrize("epochs,warmup,n_batches,accum", [(11, 5, 13, 2), (10, 5, 20, 8), (4, 1, 6, 1)])
def test_timm_schedule_matches_vificlip_reference(clip, tmp_path, epochs, warmup, n_batches, accum):
    _, ours = _train_lrs(
        clip,
        tmp_path,
        "timm_cosine",
        epochs=epochs,
        warmup=warmup,
        n_batches=n_batches,
        accum=accum,
        drop=True,
    )
    ref = _vificlip_reference_lrs(8e-6, epochs, warmup, n_batches, accum)
    assert len(ours) == len(ref) == epochs * (n_batches // accum)
    assert ours == pytest.approx(ref, rel=1e-12, abs=0)
    # not Dassl's schedule: after the warm-up it is well below a cosine restarted at the lr
    k = warmup * (n_batches // accum)
    dassl = [lr_at(e, 8e-6, epochs, warmup, 0.0, "linear") for e in range(epochs)]
    assert sum(ref[k:]) / len(ref[k:]) < 0.6 * sum(dassl[warmup:]) / len(dassl[warmup:])


@pytest.mark.parametrize("accum", [1, 2])
def test_dassl_schedule_through_the_engine_is_per_epoch(clip, tmp_path, accum):
    epochs, n_batches = 5, 5  # accumulation 2: 3 steps per epoch, the last on one batch
    _, seen = _train_lrs(
        clip, tmp_path, "dassl_cosine", epochs=epochs, warmup=1, n_batches=n_batches, accum=accum, drop=False
    )
    per = -(-n_batches // accum)
    assert seen == [
        lr_at(e, 8e-6, epochs, 1, 1e-5) for e in range(epochs) for _ in range(per)
    ]  # bit-identical


def test_resume_keeps_the_step_clock(clip, tmp_path):
    """A resumed per-iteration run steps at the same lrs and ends at the same tensors."""
    kw = dict(epochs=4, warmup=1, n_batches=5, accum=2, drop=True, base_lr=0.5)
    full, full_lrs = _train_lrs(clip, tmp_path / "full", "timm_cosine", **kw)
    with pytest.raises(KeyboardInterrupt):
        _train_lrs(clip, tmp_path / "cut", "timm_cosine", wrap=lambda b: _Interrupting(b, 2), **kw)
    resumed, tail = _train_lrs(clip, tmp_path / "cut", "timm_cosine", resume=True, **kw)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    assert tail == full_lrs[4:]  # epochs 3-4: 2 steps each
    torch.testing.assert_close(resumed.ctx, full.ctx, rtol=0, atol=0)


def test_dropping_every_batch_is_refused(clip, tmp_path):
    with pytest.raises(ValueError, match="no optimizer step"):
        _train_lrs(clip, tmp_path, "timm_cosine", epochs=2, warmup=1, n_batches=3, accum=4, drop=True)


def _features(n=24, d=32, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, d, generator=g), torch.arange(n) % c


class _Interrupting:
    """Batches that raise KeyboardInterrupt when epoch ``stop_after`` starts (a killed run)."""

    def __init__(self, inner, stop_after):
        self.inner, self.stop_after, self.epoch = inner, stop_after, 0

    def __len__(self):
        return len(self.inner)

    def __iter__(self):  # a generator, like the real batch classes: tqdm may call iter() twice
        if self.epoch == self.stop_after:
            raise KeyboardInterrupt
        self.epoch += 1
        yield from self.inner


def _run(clip, tmp_path, epochs=4, resume=False, stop_after=None, loss_hook=None):
    torch.manual_seed(0)
    module = CoOp(clip, ["red circle", "blue square", "green star"], n_ctx=2)
    if loss_hook is not None:
        module.loss = loss_hook(module.loss)
    feats, labels = _features()
    g = torch.Generator().manual_seed(1)
    batches = FeatureBatches(feats, labels, 8, g)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1, momentum=0.9)
    if stop_after is not None:
        batches = _Interrupting(batches, stop_after)
    train(
        module,
        batches,
        opt,
        epochs=epochs,
        lr_schedule=per_epoch(lambda e: lr_at(e, 0.1, epochs, 1, 1e-3), len(batches)),
        generator=g,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        resume=resume,
    )
    return module


def test_same_seed_same_numbers(clip, tmp_path):
    a = _run(clip, tmp_path / "a")
    b = _run(clip, tmp_path / "b")
    assert torch.equal(a.ctx, b.ctx)
    assert not torch.equal(a.ctx, CoOp(clip, ["x", "y", "z"], n_ctx=2).ctx)


def test_resume_ends_with_same_result(clip, tmp_path):
    full = _run(clip, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(clip, tmp_path / "cut", stop_after=2)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    resumed = _run(clip, tmp_path / "cut", resume=True)
    torch.testing.assert_close(resumed.ctx, full.ctx, rtol=0, atol=0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(clip, tmp_path):
    calls = {"n": 0}

    def hook(loss_fn):
        def loss(logits, labels, **aux):
            calls["n"] += 1
            value = loss_fn(logits, labels)
            return value * float("nan") if calls["n"] > 6 else value  # 3 steps per epoch: NaN in epoch 3

        return loss

    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        _run(clip, tmp_path, loss_hook=hook)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and torch.isfinite(ckpt["prompt_state"]["ctx"]).all()


def test_feature_batches_drop_last_like_dassl():
    feats, labels = _features(n=20)
    b = FeatureBatches(feats, labels, 8, torch.Generator().manual_seed(0))
    assert len(b) == 2 and sum(y.numel() for _, y in b) == 16
    small = FeatureBatches(feats[:, :5], labels[:5], 8, torch.Generator())
    assert len(small) == 1 and next(iter(small))[1].numel() == 5
    ev = FeatureBatches(feats, labels, 8, torch.Generator(), shuffle=False)
    assert torch.equal(torch.cat([y for _, y in ev]), labels)


def test_feature_cache_equals_direct_encoding_and_is_reused(clip, synth, tmp_path):
    items = synth.test[:10]
    direct = encode_items(clip.encode_image, items, clip.eval_transform, batch_size=4)
    a = cached_features(
        clip.encode_image,
        items,
        clip.eval_transform,
        fingerprint=clip.fingerprint(),
        cache_dir=tmp_path,
        batch_size=4,
    )
    torch.testing.assert_close(a, direct, rtol=0, atol=0)
    files = list((tmp_path / "features").glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    calls = {"n": 0}

    def counting(x):
        calls["n"] += 1
        return clip.encode_image(x)

    b = cached_features(
        counting, items, clip.eval_transform, fingerprint=clip.fingerprint(), cache_dir=tmp_path, batch_size=4
    )
    assert calls["n"] == 0 and torch.equal(a, b) and files[0].stat().st_mtime_ns == mtime
    # a different item list is a different entry
    cached_features(
        clip.encode_image, items[:5], clip.eval_transform, fingerprint=clip.fingerprint(), cache_dir=tmp_path
    )
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_corrupted_feature_cache_is_rebuilt(clip, synth, tmp_path):
    items = synth.test[:4]
    a = cached_features(clip.encode_image, items, clip.eval_transform, fingerprint="fp", cache_dir=tmp_path)
    path = next((tmp_path / "features").glob("*.safetensors"))
    path.write_bytes(b"garbage")
    b = cached_features(clip.encode_image, items, clip.eval_transform, fingerprint="fp", cache_dir=tmp_path)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_feature_cache_logs_hits_records_its_key_and_rebuilds_stale_entries(clip, synth, tmp_path, caplog):
    """The entry records its key and item count; a hit is logged and encodes nothing; an entry of another
    shape under the same key (an older layout) and an unreadable one are re-encoded with the caller's loader
    options, each with a warning naming the file and what is wrong."""
    import logging

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    sizes = []

    def encode(x):
        sizes.append(x.shape[0])
        return clip.encode_image(x)

    items = synth.test[:3]
    kw = dict(fingerprint="fp", cache_dir=tmp_path, batch_size=2)
    with caplog.at_level(logging.INFO, logger="promptlab.features"):
        a = cached_features(encode, items, clip.eval_transform, **kw)
        (path,) = (tmp_path / "features").glob("*.safetensors")
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"key": path.stem, "n": "3"}
        assert torch.equal(cached_features(encode, items, clip.eval_transform, **kw), a)
        save_file({"features": torch.zeros(1, 2, 5)}, str(path))
        assert torch.equal(cached_features(encode, items, clip.eval_transform, **kw), a)
        path.write_bytes(b"garbage")
        with pytest.raises(SafetensorError) as err:
            load_file(str(path))
        assert torch.equal(cached_features(encode, items, clip.eval_transform, **kw), a)
    assert sizes == [2, 1] * 3  # the miss and the two rebuilds; the hit encoded nothing
    hit, stale, bad = [r.getMessage() for r in caplog.records if r.name == "promptlab.features"]
    assert hit == f"feature cache hit: {path}"
    assert stale == f"feature cache {path} has shape (1, 2, 5), expected (1, 3, D): rebuilding"
    assert bad == f"feature cache {path} is unreadable ({err.value}): rebuilding"


def test_augmented_views_differ_and_are_deterministic(clip, synth):
    items = synth.train[:6]
    a = encode_items(clip.encode_image, items, clip.train_transform, views=2)
    b = encode_items(clip.encode_image, items, clip.train_transform, views=2)
    assert a.shape == (2, 6, clip.embed_dim)
    assert torch.equal(a, b) and not torch.allclose(a[0], a[1])


def test_training_views_depend_on_the_run_seed(clip, synth, tmp_path):
    """Seeds 1, 2, 3 must not train on the same augmented views (issue 14)."""
    items = synth.train[:6]
    one = encode_items(clip.encode_image, items, clip.train_transform, views=2, seed=1)
    two = encode_items(clip.encode_image, items, clip.train_transform, views=2, seed=2)
    assert torch.equal(one, encode_items(clip.encode_image, items, clip.train_transform, views=2, seed=1))
    assert not torch.allclose(one[0], two[0]) and not torch.allclose(one[1], two[1])
    assert not torch.allclose(one[1], two[0])  # seed 2's first view is not seed 1's second either
    kw = dict(fingerprint=clip.fingerprint(), cache_dir=tmp_path, views=2)
    cached_one = cached_features(clip.encode_image, items, clip.train_transform, seed=1, **kw)
    cached_two = cached_features(clip.encode_image, items, clip.train_transform, seed=2, **kw)
    assert torch.equal(cached_one, one) and torch.equal(cached_two, two)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_feature_cache_key_holds_the_backbone_fingerprint(clip, synth, tmp_path):
    """Another backbone over the same items is another cache entry, never the first one's features."""
    items = synth.test[:4]

    def other(x):  # a different "backbone": same shapes, other numbers
        return clip.encode_image(x) * -2.0 + 1.0

    a = cached_features(clip.encode_image, items, clip.eval_transform, fingerprint="A", cache_dir=tmp_path)
    b = cached_features(other, items, clip.eval_transform, fingerprint="B", cache_dir=tmp_path)
    torch.testing.assert_close(b, a * -2.0 + 1.0)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_view_seeds_are_the_recorded_derivation():
    """The training views of recorded runs reproduce only while view v of seed s draws from this seed:
    the first 8 bytes of sha256("promptlab-view:s:v"), little-endian, as a non-negative int64."""
    for seed, view in [(1, 0), (1, 1), (1, 9), (3, 2)]:  # (1, 1)'s first 8 bytes have the top bit set
        digest = hashlib.sha256(f"promptlab-view:{seed}:{view}".encode()).digest()
        assert view_seed(seed, view) == int.from_bytes(digest[:8], "little") & (2**63 - 1) < 2**63
    assert view_seed(1, 0) == 2212797774892819111


def test_training_views_are_the_recorded_draws(clip, synth):
    """View v of seed s is the transform applied to each image in item order, drawing from the global RNG
    seeded with view_seed(s, v) and nothing else drawing in between (recorded runs' views reproduce only
    while this holds); written out here with PIL and the transform alone. The encoder is the identity, so
    the crops themselves are compared."""
    from PIL import Image

    items = synth.train[:5]
    got = encode_items(lambda x: x.flatten(1), items, clip.train_transform, views=2, seed=3, batch_size=2)
    with torch.random.fork_rng(devices=[]):
        for v in range(2):
            digest = hashlib.sha256(f"promptlab-view:3:{v}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            want = [clip.train_transform(Image.open(it.path).convert("RGB")).flatten() for it in items]
            torch.testing.assert_close(got[v], torch.stack(want), atol=0, rtol=0)


def test_loader_workers_draw_the_views_of_the_run_seed(clip, synth):
    """``num_workers`` loader workers run the transforms, drawing from seeds the loader's generator gives them:
    the views still follow (seed, view), the same twice and others for another seed or another view."""
    from torch.utils.data import get_worker_info

    def crop_and_where(img):  # the crop, then 1 if a loader worker made it
        return torch.cat(
            [clip.train_transform(img).flatten(), torch.tensor([float(get_worker_info() is not None)])]
        )

    items = synth.train[:4]
    kw = dict(views=2, num_workers=1, batch_size=4)
    one = encode_items(lambda x: x, items, crop_and_where, seed=1, **kw)
    assert (one[..., -1] == 1).all()
    assert torch.equal(one, encode_items(lambda x: x, items, crop_and_where, seed=1, **kw))
    two = encode_items(lambda x: x, items, crop_and_where, seed=2, **kw)
    assert not torch.equal(one[0], one[1])
    assert not torch.equal(one[0], two[0]) and not torch.equal(one[1], two[1])


def test_encoder_receives_batches_on_the_device(clip, synth):
    """Each batch is moved to ``device`` before the encoder sees it; the features come back as float32 on CPU."""
    seen = []

    def encode(x):
        seen.append((x.device.type, x.shape[0]))
        return torch.ones(x.shape[0], 2, dtype=torch.float16)

    feats = encode_items(encode, synth.test[:3], clip.eval_transform, batch_size=2, device="meta")
    assert seen == [("meta", 2), ("meta", 1)]
    assert (
        feats.dtype == torch.float32
        and feats.device.type == "cpu"
        and torch.equal(feats, torch.ones(1, 3, 2))
    )


def test_no_items_encode_to_an_empty_tensor(clip):
    """An empty item list (an empty split) gives [V, 0] without calling the encoder."""

    def never(x):
        raise AssertionError("nothing to encode")

    assert encode_items(never, [], clip.train_transform, views=2).shape == (2, 0)


def test_feature_cache_key_holds_the_transform(clip, synth, tmp_path):
    """The same items under another transform (training crops vs evaluation) are another entry: evaluation
    must never be scored on cached training views, nor the reverse."""
    items = synth.train[:4]
    kw = dict(fingerprint=clip.fingerprint(), cache_dir=tmp_path)
    ev = cached_features(clip.encode_image, items, clip.eval_transform, **kw)
    tr = cached_features(clip.encode_image, items, clip.train_transform, **kw)  # same seed, views, tag
    assert torch.equal(tr, encode_items(clip.encode_image, items, clip.train_transform))
    assert not torch.allclose(tr, ev)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_feature_cache_keeps_each_view_count_apart(clip, synth, tmp_path):
    """One view (evaluation-style) and two views of the same items are two entries, each reused as it is."""
    items = synth.train[:3]
    kw = dict(fingerprint="fp", cache_dir=tmp_path)
    one = cached_features(clip.encode_image, items, clip.train_transform, views=1, **kw)
    two = cached_features(clip.encode_image, items, clip.train_transform, views=2, **kw)
    assert one.shape[0] == 1 and two.shape[0] == 2
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_feature_cache_keeps_each_tag_apart(clip, synth, tmp_path):
    """A caller's ``tag`` names a variant the other key parts do not see: another tag, another entry."""
    items = synth.test[:2]
    kw = dict(fingerprint="fp", cache_dir=tmp_path)
    a = cached_features(clip.encode_image, items, clip.eval_transform, tag="a", **kw)
    b = cached_features(lambda x: clip.encode_image(x) + 1.0, items, clip.eval_transform, tag="b", **kw)
    torch.testing.assert_close(b, a + 1.0)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_feature_cache_off_encodes_directly(clip, synth, tmp_path, monkeypatch):
    """cache_dir None: the same features as encode_items, with the same augmentation draws, and no file."""
    monkeypatch.chdir(tmp_path)
    items = synth.train[:3]
    sizes = []

    def encode(x):
        sizes.append(x.shape[0])
        return clip.encode_image(x)

    got = cached_features(
        encode, items, clip.train_transform, fingerprint="fp", cache_dir=None, views=2, seed=4, batch_size=2
    )
    assert sizes == [2, 1, 2, 1]  # the loader options reach encode_items
    assert got.shape == (2, 3, clip.embed_dim)
    assert torch.equal(got, encode_items(clip.encode_image, items, clip.train_transform, views=2, seed=4))
    assert not list(tmp_path.rglob("*.safetensors"))


def test_feature_cache_follows_image_content(clip, tmp_path):
    """Images rewritten in place are re-encoded (issue 15 item 6): the cache is keyed by content,
    not by path and label alone; images overwritten with random bytes fail instead of scoring."""
    from PIL import Image, ImageOps

    from promptlab.data import ImageReadError

    make_synthetic_dataset(tmp_path / "data")
    items = load_dataset("synthetic", tmp_path / "data").test[:6]
    kw = dict(fingerprint=clip.fingerprint(), cache_dir=tmp_path / "cache")
    before = cached_features(clip.encode_image, items, clip.eval_transform, **kw)
    for it in items:  # same paths, same labels, other pixels
        ImageOps.invert(Image.open(it.path).convert("RGB")).save(it.path)
    after = cached_features(clip.encode_image, items, clip.eval_transform, **kw)
    torch.testing.assert_close(after, encode_items(clip.encode_image, items, clip.eval_transform))
    assert not torch.allclose(after, before)
    g = torch.Generator().manual_seed(0)
    for it in items:
        Path(it.path).write_bytes(
            torch.randint(0, 256, (500,), generator=g, dtype=torch.uint8).numpy().tobytes()
        )
    with pytest.raises(ImageReadError):
        cached_features(clip.encode_image, items, clip.eval_transform, **kw)


def _view_tagged(views: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose values name their (view, image): feats[v, i] = [v, i]."""
    v, i = torch.meshgrid(torch.arange(views), torch.arange(n), indexing="ij")
    return torch.stack([v, i], dim=-1).float(), torch.arange(n) % 3


def test_feature_batches_draw_one_view_per_image_per_epoch():
    """The README's "each epoch uses one of them per image": every image once per epoch, from one of its views,
    the views varying across images and epochs (not always view 0)."""
    views, n = 10, 48
    feats, labels = _view_tagged(views, n)
    batches = FeatureBatches(feats, labels, 8, torch.Generator().manual_seed(0))
    drawn = []
    for _ in range(20):
        epoch = torch.cat([x["image_features"] for x, _ in batches])  # [N, 2]: (view, image)
        assert sorted(epoch[:, 1].long().tolist()) == list(range(n))  # each image exactly once
        order = epoch[:, 1].long().argsort()
        drawn.append(epoch[order, 0].long())  # [N] view of each image this epoch
    drawn = torch.stack(drawn)  # [epochs, N]
    assert set(drawn.unique().tolist()) == set(range(views))  # every view gets used
    assert (drawn != drawn[0]).any(dim=0).float().mean() > 0.9  # an image's view changes across epochs
    assert drawn[0].unique().numel() > 5  # and differs between images within an epoch
    counts = torch.bincount(drawn.flatten(), minlength=views).float()
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform over the views


def test_cache_miss_leaves_global_rng_alone(clip, synth):
    torch.manual_seed(3)
    encode_items(clip.encode_image, synth.train[:2], clip.train_transform, views=2)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


def test_encoding_and_evaluation_run_without_autograd(clip, synth):
    """encode_items and evaluate build no graph (cached features and evaluation logits hold none, so memory
    stays flat over a large test set, even for a module whose context requires grad) and hand grad mode
    back."""
    modes = []

    def encode(x):
        modes.append(torch.is_grad_enabled())
        return clip.encode_image(x)

    feats = encode_items(encode, synth.test[:3], clip.eval_transform, batch_size=2)
    assert modes == [False, False] and not feats.requires_grad and torch.is_grad_enabled()
    module = CoOp(clip, synth.classnames, n_ctx=2)
    seen = []
    module.observe_eval = lambda logits, labels: seen.append((torch.is_grad_enabled(), logits.requires_grad))
    module.end_eval = lambda: {"grad": torch.is_grad_enabled()}
    labels = torch.tensor([it.label for it in synth.test[:3]])
    out = evaluate(module, [({"image_features": feats[0]}, labels)], device=torch.device("cpu"))
    assert seen == [(False, False)] and out["method_stats"] == {"grad": False} and torch.is_grad_enabled()


def test_evaluate_from_cache_equals_evaluate_from_images(clip, synth):
    module = CoOp(clip, synth.classnames, n_ctx=2)
    items = synth.test
    labels = torch.tensor([it.label for it in items])
    feats = encode_items(clip.encode_image, items, clip.eval_transform)
    g = torch.Generator()
    m1 = evaluate(module, FeatureBatches(feats, labels, 7, g, shuffle=False), device=torch.device("cpu"))
    m2 = evaluate(
        module,
        ImageBatches(ImageDataset(items, clip.eval_transform), 7, g, shuffle=False),
        device=torch.device("cpu"),
    )
    assert m1 == m2 and m1["n"] == len(items)
    assert 0.0 <= m1["accuracy"] <= 100.0


class _LogitsIn(torch.nn.Module):
    """A two-class "method" whose logits are its input: evaluate's bookkeeping without a model. Records the
    autocast state of each forward; ``end_eval`` returns ``stats``."""

    classnames = ["a", "b"]

    def __init__(self, stats: dict | None = None) -> None:
        super().__init__()
        self.stats = stats or {}
        self.autocast: list[tuple[bool, torch.dtype]] = []

    def forward(self, image_features):
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return image_features

    def begin_eval(self):
        pass

    def observe_eval(self, logits, labels):
        pass

    def end_eval(self):
        return self.stats

    def cached_text_features(self):
        from contextlib import nullcontext

        return nullcontext()


def test_evaluate_counts_correctly():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    m = evaluate(_LogitsIn(), [({"image_features": logits}, labels)], device=torch.device("cpu"))  # type: ignore[arg-type]
    assert m["accuracy"] == 75.0 and m["mean_per_class_accuracy"] == 75.0 and m["n"] == 4


class _Dropping(list):
    """Batches that dropped unreadable files, as VideoBatches records them."""

    def __init__(self, batches: list, skipped: list[str]) -> None:
        super().__init__(batches)
        self.skipped = skipped


def test_evaluate_skips_empty_batches_counts_dropped_files_and_passes_method_stats(caplog):
    """Empty label batches (a DDP process's share of the last batch) are passed over wherever they come, a
    one-label batch is not; the forward runs under the requested autocast; dropped files are counted, named
    (sorted) and warned about (none dropped: an empty record, no warning); end_eval's statistics come as
    method_stats (none: no key); a caller's evaluator replaces the accuracy; the inputs go to ``device``."""
    import logging

    batches = [
        ({"image_features": torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])}, torch.tensor([0, 1, 1])),
        ({"image_features": torch.zeros(0, 2)}, torch.zeros(0, dtype=torch.long)),
        ({"image_features": torch.tensor([[1.0, 0.0]])}, torch.tensor([0])),
    ]
    cpu = torch.device("cpu")
    module = _LogitsIn({"routed": 3})
    with caplog.at_level(logging.WARNING, logger="promptlab.engine"):
        out = evaluate(module, _Dropping(batches, ["b.jpg", "a.jpg"]), device=cpu, amp="bf16")
    assert out == {
        "accuracy": 75.0,  # 3 of 4; class a 2 of 2, class b 1 of 2
        "mean_per_class_accuracy": 75.0,
        "n": 4,
        "skipped": {"count": 2, "files": ["a.jpg", "b.jpg"]},
        "method_stats": {"routed": 3},
    }
    assert module.autocast == [(True, torch.bfloat16)] * 2
    assert caplog.messages == ["evaluation skipped 2 unreadable file(s); n=4 counts the others"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="promptlab.engine"):
        out = evaluate(_LogitsIn(), _Dropping(batches, []), device=cpu)
    assert out["skipped"] == {"count": 0, "files": []} and "method_stats" not in out and not caplog.messages

    class Counting:
        def __init__(self) -> None:
            self.labels: list[int] = []
            self.devices: set[str] = set()

        def observe(self, module, inputs, labels):
            self.labels += labels.tolist()
            self.devices.add(inputs["image_features"].device.type)

        def result(self):
            return {"labels": self.labels}

    counting = Counting()  # on the meta device: the inputs are moved to ``device`` before the forward
    assert evaluate(_LogitsIn(), batches, device=torch.device("meta"), evaluator=counting) == {
        "labels": [0, 1, 1, 0]
    }
    assert counting.devices == {"meta"}


def _one_epoch(clip, tmp_path, **kw):
    torch.manual_seed(0)
    module = CoOp(clip, ["red circle", "blue square", "green star"], n_ctx=2)
    start = module.ctx.detach().clone()
    feats, labels = _features()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
    res = train(
        module,
        FeatureBatches(feats, labels, 8, g),
        opt,
        epochs=1,
        lr_schedule=lambda k: 1.0,
        generator=g,
        run_dir=tmp_path,
        device=torch.device("cpu"),
        **kw,
    )
    return module, start, res


def test_bf16_autocast_trains_with_fp32_master_weights(clip, tmp_path):
    module, start, res = _one_epoch(clip, tmp_path, amp="bf16")
    assert module.ctx.dtype == torch.float32 and math.isfinite(res.last_loss)
    assert not torch.equal(module.ctx, start)


def test_grad_clip_bounds_the_update(clip, tmp_path):
    free, start, _ = _one_epoch(clip, tmp_path / "free")
    clipped, start2, _ = _one_epoch(clip, tmp_path / "clip", grad_clip=1e-4)
    assert torch.equal(start, start2)
    step_free = (free.ctx - start).norm()
    step_clipped = (clipped.ctx - start).norm()
    assert step_clipped <= 3 * 1e-4 + 1e-7 < step_free  # 3 steps of lr 1.0 with |g| <= 1e-4


def test_param_group_lr_scale_follows_the_schedule(clip, tmp_path):
    """A group's ``lr_scale`` (PromptModule.optimizer_param_groups) multiplies the schedule's lr every epoch."""
    torch.manual_seed(0)
    module = CoOp(clip, ["red circle", "blue square", "green star"], n_ctx=2)
    slow = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [module.ctx]}, {"params": [slow], "lr_scale": 0.1}], lr=1.0)
    seen, loss = [], module.loss

    def recording(*args, **kwargs):
        seen.append([g["lr"] for g in opt.param_groups])
        return loss(*args, **kwargs)

    module.loss = recording
    feats, labels = _features()
    batches = FeatureBatches(feats, labels, 8, torch.Generator().manual_seed(0))
    schedule = [0.5, 0.2, 0.1]
    train(
        module,
        batches,
        opt,
        epochs=3,
        lr_schedule=per_epoch(lambda e: schedule[e], len(batches)),
        generator=torch.Generator().manual_seed(0),
        run_dir=tmp_path,
        device=torch.device("cpu"),
    )
    epoch_lrs = [lr for step in seen[:: len(batches)] for lr in step]
    assert epoch_lrs == pytest.approx([v for lr in schedule for v in (lr, 0.1 * lr)], rel=1e-12)


def test_runner_seeds_training_views_with_the_run_seed(tmp_path, monkeypatch):
    """`promptlab run seed=S` encodes its training views with seed S; the test set (no randomness) with 0."""
    import promptlab.runner
    import promptlab.tasks
    from promptlab.config import load_recipe

    seen = []
    real = promptlab.tasks.cached_features

    def spy(*args, **kw):
        seen.append((kw["views"], kw["seed"]))
        return real(*args, **kw)

    monkeypatch.setattr(promptlab.tasks, "cached_features", spy)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "coop_tiny.yaml"
    for seed in (2, 3):
        overrides = [
            f"seed={seed}",
            "train.epochs=1",
            f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / str(seed)}",
        ]
        cfg = load_recipe(recipe, overrides, check_paths=False)
        promptlab.runner.ensure_data(cfg)
        promptlab.runner.run(cfg)
    assert seen == [(2, 2), (1, 0), (2, 3), (1, 0)]  # (views, seed): training views, then the test set


def test_feature_batches_shards_partition_each_global_batch():
    """Under DDP every process draws the same global batch and keeps its part: the shards of each batch,
    side by side, are the unsharded batch (same generator seed in every process)."""
    feats, labels = _view_tagged(3, 21)
    whole = list(FeatureBatches(feats, labels, 8, torch.Generator().manual_seed(5)))
    parts = [
        list(FeatureBatches(feats, labels, 8, torch.Generator().manual_seed(5), shard=(r, 3)))
        for r in range(3)
    ]
    assert len(whole) == 2 and [len(p) for p in parts] == [2, 2, 2]
    for b, (x, y) in enumerate(whole):
        assert all(p[b][1].numel() > 0 for p in parts)
        assert torch.equal(torch.cat([p[b][0]["image_features"] for p in parts]), x["image_features"])
        assert torch.equal(torch.cat([p[b][1] for p in parts]), y)


@pytest.mark.parametrize("views", [1, 2])
def test_feature_batches_draw_order_is_the_recorded_one(views):
    """Recorded runs reproduce only while an epoch draws, from the run's generator, one view per image
    (``randint(V, (N,))``, nothing at all for a single view) and then the order (``randperm(N)``)."""
    n, bs = 10, 4
    feats, labels = _view_tagged(views, n)
    batches = FeatureBatches(feats, labels, bs, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for _ in range(2):  # two epochs: the second continues the generator
        view = torch.randint(views, (n,), generator=g) if views > 1 else torch.zeros(n, dtype=torch.long)
        order = torch.randperm(n, generator=g)
        got = [(x["image_features"], y) for x, y in batches]
        assert len(got) == n // bs
        for b, (x, y) in enumerate(got):
            idx = order[b * bs : (b + 1) * bs]
            assert x[:, 1].long().tolist() == idx.tolist() and torch.equal(y, labels[idx])
            assert x[:, 0].long().tolist() == view[idx].tolist()


class _FixedLogits(torch.nn.Module):
    """A module whose logits are its inputs; it keeps what evaluation hands to observe_eval."""

    classnames = ["a", "b", "c"]

    def __init__(self):
        super().__init__()
        self.observed = []

    def forward(self, image_features):
        return image_features

    def observe_eval(self, logits, labels):
        self.observed.append((logits, labels))


def test_accuracy_evaluator_weighs_present_classes_equally_over_batches():
    """Class a: 3 of 3 right, class b: 0 of 1, class c: absent. Top-1 3/4; per class (100 + 0) / 2."""
    from promptlab.engine import AccuracyEvaluator

    module, ev = _FixedLogits(), AccuracyEvaluator(3)
    one_hot = torch.eye(3)
    batches = [(one_hot[[0, 0]], torch.tensor([0, 0])), (one_hot[[2, 0]], torch.tensor([1, 0]))]
    for logits, labels in batches:
        ev.observe(module, {"image_features": logits}, labels)
    assert ev.result() == {"accuracy": 75.0, "mean_per_class_accuracy": 50.0, "n": 4}
    assert len(module.observed) == 2
    assert all(torch.equal(o[0], b[0]) and torch.equal(o[1], b[1]) for o, b in zip(module.observed, batches))


def test_accuracy_evaluator_on_one_sample_and_on_none():
    from promptlab.engine import AccuracyEvaluator

    ev = AccuracyEvaluator(3)
    ev.observe(_FixedLogits(), {"image_features": torch.tensor([[0.0, 0.0, 1.0]])}, torch.tensor([2]))
    assert ev.result() == {"accuracy": 100.0, "mean_per_class_accuracy": 100.0, "n": 1}
    assert AccuracyEvaluator(3).result() == {"accuracy": 0.0, "mean_per_class_accuracy": 0.0, "n": 0}


def test_image_batches_follow_dassls_drop_rule_and_shard(clip, synth):
    """Training batches drop the last short one when there is a full one (Dassl), unless told not to;
    evaluation batches hold every item once, in order; under DDP the shards of each global batch, side
    by side, are that batch."""
    items = synth.train[:10]
    ds = ImageDataset(items, clip.eval_transform)
    train_batches = ImageBatches(ds, 4, torch.Generator().manual_seed(0))
    got = list(train_batches)
    assert len(train_batches) == len(got) == 2 and all(x["images"].shape[0] == y.numel() == 4 for x, y in got)
    assert len(ImageBatches(ds, 4, torch.Generator(), drop_last=False)) == 3
    ev = ImageBatches(ds, 4, torch.Generator(), shuffle=False)
    assert len(ev) == 3 and torch.cat([y for _, y in ev]).tolist() == [it.label for it in items]
    whole = list(ImageBatches(ds, 4, torch.Generator().manual_seed(3)))
    parts = [list(ImageBatches(ds, 4, torch.Generator().manual_seed(3), shard=(r, 2))) for r in range(2)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[b][0]["images"] for p in parts]), x["images"])
        assert torch.equal(torch.cat([p[b][1] for p in parts]), y)


class _WhereLoaded(torch.utils.data.Dataset):
    """Four items, each a tensor naming the DataLoader worker that loaded it (-1: the caller's process)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        info = torch.utils.data.get_worker_info()
        return torch.tensor([-1.0 if info is None else float(info.id)]), i, f"item{i}"


def test_image_batches_load_in_this_process_unless_given_workers():
    """By default the items load in the caller's process (no worker to start: the sandbox's setting);
    with ``num_workers=2`` the two batches come from the two workers in turn (mutmut engine ImageBatches
    2, 16)."""
    default = ImageBatches(_WhereLoaded(), 2, torch.Generator(), shuffle=False)
    assert torch.cat([x["images"] for x, _ in default]).flatten().tolist() == [-1.0] * 4
    workers = ImageBatches(_WhereLoaded(), 2, torch.Generator(), shuffle=False, num_workers=2)
    assert torch.cat([x["images"] for x, _ in workers]).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory")
def test_image_batches_pin_memory_only_when_asked():
    """``pin_memory=True`` gives page-locked batches (the copy to the GPU overlaps the step); the default
    does not pin (mutmut engine ImageBatches 3, 14, 19: on a CPU-only machine the two are the same)."""
    pinned = next(iter(ImageBatches(_WhereLoaded(), 2, torch.Generator(), shuffle=False, pin_memory=True)))
    assert pinned[0]["images"].is_pinned() and pinned[1].is_pinned()
    plain = next(iter(ImageBatches(_WhereLoaded(), 2, torch.Generator(), shuffle=False)))
    assert not plain[0]["images"].is_pinned() and not plain[1].is_pinned()
