"""make_schedule and its parts, step by step, against the schedulers the recipes reproduce.

Every reference below replays a real scheduler (torch's CosineAnnealingLR, Dassl's warm-up over a
per-epoch cosine, timm's CosineLRScheduler) over the optimizer steps that the training loop takes:
a step ends every ``accum`` batches, and the epoch's last, shorter group steps too unless it is
dropped. Nothing here calls promptlab's ``lr_at``, ``steps_per_epoch`` or ``timm_cosine_lr`` for
the expected side. Mutation testing (issue 24) found ``make_schedule``'s accumulation, drop, floor
and default branches pinned only through the two recipes that reach them.
"""

from __future__ import annotations

import pytest
import torch

from promptlab.engine import make_schedule, per_epoch, steps_per_epoch, timm_cosine_lr


def _step_ends(n_batches: int, accum: int, drop: bool) -> list[int]:
    """The batch indices of an epoch after which the optimizer steps (the training loop's rule)."""
    full = [i for i in range(n_batches) if (i + 1) % accum == 0]
    if not drop and n_batches % accum:
        full.append(n_batches - 1)
    return full


def _opt(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _torch_cosine(base_lr: float, total: int, eta_min: float) -> list[float]:
    """torch's CosineAnnealingLR(T_max=total) stepped after every optimizer step (Tip-Adapter-F, CLIP-LoRA)."""
    opt = _opt(base_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=eta_min)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: nothing moves (torch warns of a scheduler stepped before it)
        sched.step()
    return lrs


def _dassl_epochs(base_lr: float, epochs: int, warmup: int, warmup_lr: float, kind: str) -> list[float]:
    """Dassl's Constant-/LinearWarmupScheduler over CosineAnnealingLR(T_max=epochs), one lr per epoch.

    Dassl's linear warm-up is min_lr at epoch 0 and base_lr * e / warmup after it (equal to a rise from
    warmup_lr only for warmup_lr = 0, the value used with it here)."""
    opt = _opt(base_lr)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = []
    for e in range(epochs):
        if e < warmup:
            lrs.append(warmup_lr if kind == "constant" or e == 0 else base_lr * e / warmup)
        else:
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            successor.step()
    return lrs


def _timm(base_lr, epochs, warmup, n_batches, accum, drop, warmup_lr, lr_min) -> list[float]:
    """timm's CosineLRScheduler stepped with step_update(epoch * n + idx) after each optimizer step
    (ViFi-CLIP main.py), with the epoch's shorter last group stepping too unless dropped."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = CosineLRScheduler(
        opt,
        t_initial=epochs * n_batches,
        lr_min=lr_min,
        warmup_lr_init=warmup_lr,
        warmup_t=warmup * n_batches,
        cycle_limit=1,
        t_in_epochs=False,
    )
    lrs = []
    for epoch in range(epochs):
        for idx in _step_ends(n_batches, accum, drop):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step_update(epoch * n_batches + idx)
    return lrs


@pytest.mark.parametrize(
    "n_batches,accum,drop,expected",
    [(7, 3, False, 3), (7, 3, True, 2), (6, 3, True, 2), (6, 3, False, 2), (2, 3, True, 0), (5, 1, True, 5)],
)
def test_steps_per_epoch_counts_the_loops_steps(n_batches, accum, drop, expected):
    assert steps_per_epoch(n_batches, accum, drop) == len(_step_ends(n_batches, accum, drop)) == expected


def test_steps_per_epoch_reads_no_accumulation_as_one():
    assert steps_per_epoch(5, 0, False) == steps_per_epoch(5, 0, True) == 5


def test_per_epoch_holds_each_epochs_lr_for_its_steps():
    lrs = [0.5, 0.25, 0.125]
    assert [per_epoch(lambda e: lrs[e], 3)(k) for k in range(9)] == [v for v in lrs for _ in range(3)]
    assert [per_epoch(lambda e: lrs[e], 1)(k) for k in range(3)] == lrs
    assert [per_epoch(lambda e: lrs[e], 0)(k) for k in range(3)] == lrs  # an empty epoch: one step each


@pytest.mark.parametrize(
    "epochs,n_batches,accum,drop,max_steps,ratio",
    [
        (3, 7, 3, False, None, 0.0),
        (3, 7, 3, True, None, 0.1),
        (4, 5, 1, False, 7, 0.01),
        (2, 1, 1, False, None, 0.5),
    ],
)
def test_cosine_is_torchs_per_step_cosine(epochs, n_batches, accum, drop, max_steps, ratio):
    total = max_steps or epochs * len(_step_ends(n_batches, accum, drop))
    ref = _torch_cosine(0.1, total, 0.1 * ratio)
    s = make_schedule(
        "cosine",
        base_lr=0.1,
        epochs=epochs,
        batches_per_epoch=n_batches,
        accum=accum,
        drop_partial=drop,
        min_lr_ratio=ratio,
        max_steps=max_steps,
    )
    assert [s(k) for k in range(total)] == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_cosine_defaults_step_every_batch_down_to_zero():
    s = make_schedule("cosine", base_lr=0.1, epochs=2, batches_per_epoch=5)
    assert [s(k) for k in range(10)] == pytest.approx(_torch_cosine(0.1, 10, 0.0), rel=1e-9, abs=1e-15)
    grouped = make_schedule("cosine", base_lr=0.1, epochs=2, batches_per_epoch=5, accum=2)  # 3 steps an epoch
    assert [grouped(k) for k in range(6)] == pytest.approx(_torch_cosine(0.1, 6, 0.0), rel=1e-9, abs=1e-15)


def test_cosine_refuses_a_warm_up():
    with pytest.raises(
        ValueError, match=r"^train\.lr_schedule=cosine has no warm-up: set train\.warmup_epochs=0$"
    ):
        make_schedule("cosine", base_lr=0.1, epochs=2, batches_per_epoch=5, warmup_epochs=1)


@pytest.mark.parametrize(
    "n_batches,accum,drop,warmup,kind",
    [
        (5, 1, False, 1, "constant"),
        (7, 3, False, 2, "constant"),
        (7, 3, True, 1, "constant"),
        (4, 2, False, 3, "linear"),
    ],
)
def test_dassl_cosine_is_dassls_per_epoch_lr_on_every_step(n_batches, accum, drop, warmup, kind):
    epochs, base = 6, 0.002
    warmup_lr = 1e-5 if kind == "constant" else 0.0
    per_epoch_ref = _dassl_epochs(base, epochs, warmup, warmup_lr, kind)
    ref = [lr for lr in per_epoch_ref for _ in _step_ends(n_batches, accum, drop)]
    s = make_schedule(
        "dassl_cosine",
        base_lr=base,
        epochs=epochs,
        batches_per_epoch=n_batches,
        accum=accum,
        drop_partial=drop,
        warmup_epochs=warmup,
        warmup_lr=warmup_lr,
        warmup_type=kind,
    )
    assert [s(k) for k in range(len(ref))] == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_dassl_cosine_defaults_are_coops_constant_warm_up():
    """warmup_epochs alone: CoOp's constant 1e-5 for those epochs, one step per batch."""
    epochs, base = 5, 0.002
    ref = [lr for lr in _dassl_epochs(base, epochs, 2, 1e-5, "constant") for _ in range(3)]
    s = make_schedule("dassl_cosine", base_lr=base, epochs=epochs, batches_per_epoch=3, warmup_epochs=2)
    assert [s(k) for k in range(15)] == pytest.approx(ref, rel=1e-9, abs=1e-15)
    no_warmup = make_schedule("dassl_cosine", base_lr=base, epochs=epochs, batches_per_epoch=3)
    assert [no_warmup(k) for k in range(15)] == pytest.approx(
        [lr for lr in _dassl_epochs(base, epochs, 0, 1e-5, "constant") for _ in range(3)], rel=1e-9
    )


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_constant_is_base_lr_after_the_warm_up(kind):
    """AnomalyCLIP's Adam has no scheduler: base_lr throughout, behind the recipe's warm-up if any."""
    epochs, base, warmup = 5, 0.01, 3
    warmup_lr = 1e-3 if kind == "constant" else 0.0
    ref = [
        (warmup_lr if kind == "constant" or e == 0 else base * e / warmup) if e < warmup else base
        for e in range(epochs)
        for _ in _step_ends(7, 3, True)
    ]
    s = make_schedule(
        "constant",
        base_lr=base,
        epochs=epochs,
        batches_per_epoch=7,
        accum=3,
        drop_partial=True,
        warmup_epochs=warmup,
        warmup_lr=warmup_lr,
        warmup_type=kind,
    )
    assert [s(k) for k in range(len(ref))] == pytest.approx(ref, rel=1e-12, abs=0)
    plain = make_schedule("constant", base_lr=base, epochs=epochs, batches_per_epoch=7, warmup_epochs=1)
    assert [plain(k) for k in range(14)] == [1e-5] * 7 + [base] * 7  # CoOp's warm-up lr by default


@pytest.mark.parametrize(
    "epochs,warmup,n_batches,accum,drop",
    [(4, 1, 7, 3, False), (3, 1, 3, 2, True), (3, 0, 4, 1, False), (5, 1, 1, 1, False), (3, 2, 5, 2, False)],
)
def test_timm_cosine_is_timms_scheduler_stepped_per_update(epochs, warmup, n_batches, accum, drop):
    """Including what ViFi-CLIP never runs: the epoch's shorter last group stepping (drop off), no
    warm-up (the first step at base_lr), one step per epoch."""
    base, warmup_lr, ratio = 8e-6, 1e-7, 0.01
    ref = _timm(base, epochs, warmup, n_batches, accum, drop, warmup_lr, base * ratio)
    s = make_schedule(
        "timm_cosine",
        base_lr=base,
        epochs=epochs,
        batches_per_epoch=n_batches,
        accum=accum,
        drop_partial=drop,
        warmup_epochs=warmup,
        warmup_lr=warmup_lr,
        warmup_type="linear",
        min_lr_ratio=ratio,
    )
    assert [s(k) for k in range(len(ref))] == pytest.approx(ref, rel=1e-12, abs=0)


def test_timm_cosine_defaults_decay_to_zero_without_warm_up():
    ref = _timm(0.1, 3, 0, 4, 1, False, 0.0, 0.0)
    s = make_schedule("timm_cosine", base_lr=0.1, epochs=3, batches_per_epoch=4)
    assert [s(k) for k in range(12)] == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_timm_cosine_lr_past_the_cycle_is_the_floor():
    """timm_cosine_lr at every update of a warm-up and a cycle, and past it, is timm's _get_lr."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = CosineLRScheduler(
        opt, t_initial=12, lr_min=0.01, warmup_lr_init=0.05, warmup_t=3, cycle_limit=1, t_in_epochs=False
    )
    ours = [timm_cosine_lr(t, 0.5, 12, 3, 0.05, 0.01) for t in range(20)]
    assert ours == pytest.approx([sched._get_lr(t)[0] for t in range(20)], rel=1e-12, abs=0)
    assert ours[12:] == [0.01] * 8


def test_timm_cosine_refuses_a_constant_warm_up():
    with pytest.raises(
        ValueError, match=r"^train\.lr_schedule=timm_cosine warms up linearly: set train\.warmup_type=linear$"
    ):
        make_schedule("timm_cosine", base_lr=0.1, epochs=3, batches_per_epoch=4, warmup_epochs=1)
    make_schedule(
        "timm_cosine", base_lr=0.1, epochs=3, batches_per_epoch=4, warmup_type="constant"
    )  # no warm-up


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"^lr schedule 'step': expected one of .*dassl_cosine.*timm_cosine"):
        make_schedule("step", base_lr=0.1, epochs=3, batches_per_epoch=4)
