"""train(): what it reports (writer, log lines, progress, result), where it checkpoints, how it accumulates
gradients and when it refuses to run. Each test pins behaviour that a mutant of ``train`` changed while
the older engine tests still passed (issue #24, mutmut target ``engine``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

import promptlab.distributed
import promptlab.runlog
from promptlab.engine import FeatureBatches, TrainResult, per_epoch, train
from promptlab.methods import CoOp

CLASSES = ["red circle", "blue square", "green star"]
LRS = [0.5, 0.2, 0.1, 0.05, 0.02]  # one learning rate per epoch, each distinct


def _coop(clip) -> CoOp:
    torch.manual_seed(0)
    return CoOp(clip, CLASSES, n_ctx=2)


def _features(clip, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of ``n`` random features; labels cycle over the three classes."""
    return torch.randn(2, n, clip.embed_dim, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3


class _Writer:
    """A TensorBoard-like writer that keeps every scalar it is given."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


class _CheckpointAtEpochStart:
    """Batches that note, as each epoch starts, the checkpoint on disk: (epoch, step), or None."""

    def __init__(self, inner: FeatureBatches, ckpt: Path) -> None:
        self.inner, self.ckpt, self.seen = inner, ckpt, []

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.seen.append(_on_disk(self.ckpt))
        yield from self.inner


def _train_features(module: CoOp, feats, labels, *, opt=None, shuffle: bool = True, **kw) -> TrainResult:
    """train() over FeatureBatches of 8 at a constant lr of 0.1, one epoch on the CPU unless ``kw`` says
    otherwise: the plain loop that most tests here change one argument of."""
    g = torch.Generator().manual_seed(1)
    return train(
        module,
        FeatureBatches(feats, labels, 8, g, shuffle=shuffle),
        opt or torch.optim.SGD(module.trainable_parameters(), lr=0.1),
        lr_schedule=lambda k: 0.1,
        generator=g,
        **{"epochs": 1, "device": torch.device("cpu"), **kw},
    )


def _on_disk(ckpt: Path) -> tuple[int, int] | None:
    if not ckpt.exists():
        return None
    saved = torch.load(ckpt, weights_only=True)
    return saved["epoch"], saved["step"]


def _steps_of(module: CoOp, opt: torch.optim.Optimizer) -> list[dict]:
    """Wrap the module's training step to record, per batch, the mode, lr, loss and correct count."""
    steps, real = [], module.training_step

    def recording(inputs, labels):
        logits, loss = real(inputs, labels)
        correct = int((logits.argmax(-1) == labels).sum())
        steps.append({"training": module.training, "lr": opt.param_groups[0]["lr"], "loss": loss.item()})
        steps[-1]["correct"] = correct
        return logits, loss

    module.training_step = recording
    return steps


def _expected_reports(steps: list[dict], first_step: int, first_epoch: int, epochs: int, n: int):
    """The writer scalars (``log_every=2``) and epoch log lines a run of these steps should give."""
    per = len(steps) // (epochs - first_epoch)
    scalars, lines = [], []
    for e in range(first_epoch, epochs):
        chunk = steps[(e - first_epoch) * per : (e - first_epoch + 1) * per]
        for j, s in enumerate(chunk):
            k = first_step + (e - first_epoch) * per + j  # the run's batch counter
            if k % 2 == 0:
                scalars += [("train/loss", s["loss"], k), ("train/lr", LRS[e], k)]
        acc = 100.0 * sum(s["correct"] for s in chunk) / n
        scalars += [("train/epoch_accuracy", acc, e + 1), ("train/epoch_lr", LRS[e], e + 1)]
        lines.append(
            f"epoch {e + 1}/{epochs}  lr {LRS[e]:.3g}  loss {chunk[-1]['loss']:.4f}  train acc {acc:.2f}"
        )
    return scalars, lines


def test_train_reports_checkpoints_and_resumes_as_recorded(tiny_clip, tmp_path, caplog, capsys, monkeypatch):
    """Four epochs of 3 batches, ``checkpoint_every=3``, ``log_every=2``: the writer gets the loss and lr of
    every other batch and each epoch's training accuracy and lr; each epoch logs one line and off a
    terminal every batch a progress line (``PLAIN_EVERY=0``); checkpoints land after epoch 3 and at the
    end with the optimizer step count; the module trains in training mode and ends in eval mode; nothing
    is printed (no profiler by default). A resume to 5 epochs starts from that checkpoint and says so;
    a run without ``resume`` in the same folder starts over and checkpoints every epoch by default."""
    monkeypatch.setattr(promptlab.runlog, "PLAIN_EVERY", 0.0)
    monkeypatch.setattr(promptlab.runlog, "is_terminal", lambda stream=None: False)
    caplog.set_level(logging.INFO)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    feats, labels = _features(tiny_clip)

    def run(epochs: int, **kw):
        module = _coop(tiny_clip)
        opt = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
        steps, writer = _steps_of(module, opt), _Writer()
        g = torch.Generator().manual_seed(1)
        batches = _CheckpointAtEpochStart(FeatureBatches(feats, labels, 8, g), ckpt)
        caplog.clear()
        result = train(
            module,
            batches,
            opt,
            epochs=epochs,
            lr_schedule=per_epoch(lambda e: LRS[e], 3),
            generator=g,
            run_dir=tmp_path,
            device=torch.device("cpu"),
            writer=writer,
            log_every=2,
            **kw,
        )
        assert all(s["training"] for s in steps) and not module.training
        engine_lines = [r.getMessage() for r in caplog.records if r.name == "promptlab.engine"]
        progress = [r.getMessage().rsplit(" (", 1)[0] for r in caplog.records if r.name == "promptlab.runlog"]
        return result, steps, writer.scalars, engine_lines, progress, batches.seen

    result, steps, scalars, lines, progress, at_start = run(4, checkpoint_every=3)
    assert [s["lr"] for s in steps] == [lr for lr in LRS[:4] for _ in range(3)]
    assert result == TrainResult(epochs_run=4, last_loss=steps[-1]["loss"], resumed_from=0)
    assert (scalars, lines) == _expected_reports(steps, 0, 0, 4, 24)
    assert progress == [f"epoch {e}: {i}/3" for e in range(1, 5) for i in range(1, 4)]
    assert at_start == [None, None, None, (3, 9)] and _on_disk(ckpt) == (4, 12)
    assert capsys.readouterr().out == ""

    result, steps, scalars, lines, _, at_start = run(5, resume=True, checkpoint_every=3)
    assert result == TrainResult(epochs_run=1, last_loss=steps[-1]["loss"], resumed_from=4)
    assert lines[0] == f"resumed from {ckpt} at epoch 4/5 (optimizer step 12)"
    assert (scalars, lines[1:]) == _expected_reports(steps, 12, 4, 5, 24)
    assert at_start == [(4, 12)] and _on_disk(ckpt) == (5, 15)

    result, steps, _, _, _, at_start = run(2)  # no resume: from scratch, over the old checkpoint
    assert result == TrainResult(epochs_run=2, last_loss=steps[-1]["loss"], resumed_from=0)
    assert at_start == [(5, 15), (1, 3)] and _on_disk(ckpt) == (2, 6)


def test_two_accumulated_batches_step_as_one_batch_twice_the_size(tiny_clip, tmp_path):
    """``grad_accum_steps=2`` over batches of 4 steps with the mean gradient of each pair: the same
    updates as batches of 8 (the same draws: one generator seed), and half as many as without it."""
    feats, labels = _features(tiny_clip)

    def run(batch: int, accum: int) -> tuple[torch.Tensor, int]:
        module = _coop(tiny_clip)
        opt = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
        n_steps = []
        opt.register_step_post_hook(lambda *_: n_steps.append(1))
        g = torch.Generator().manual_seed(1)
        train(
            module,
            FeatureBatches(feats, labels, batch, g),
            opt,
            epochs=1,
            lr_schedule=lambda k: 2.0 / (1 + k),
            generator=g,
            run_dir=tmp_path / f"{batch}-{accum}",
            device=torch.device("cpu"),
            grad_accum_steps=accum,
        )
        return module.ctx.detach(), len(n_steps)

    (ctx8, steps8), (ctx4x2, steps4x2), (ctx4, steps4) = run(8, 1), run(4, 2), run(4, 1)
    assert steps8 == steps4x2 == 3 and steps4 == 6
    torch.testing.assert_close(ctx4x2, ctx8, rtol=1e-5, atol=1e-6)
    assert (ctx4 - ctx8).abs().max() > 1e-3


def test_a_run_that_would_never_step_is_refused_only_when_it_trains(tiny_clip, tmp_path):
    """3 batches per epoch, accumulation 4, partial groups dropped: no optimizer step would ever run, so
    one epoch is refused (naming the numbers); zero epochs is nothing to train and returns."""
    feats, labels = _features(tiny_clip, n=6)

    def run(epochs: int) -> TrainResult:
        module = _coop(tiny_clip)
        g = torch.Generator().manual_seed(1)
        return train(
            module,
            FeatureBatches(feats, labels, 2, g),
            torch.optim.SGD(module.trainable_parameters(), lr=1.0),
            epochs=epochs,
            lr_schedule=lambda k: 1.0,
            generator=g,
            run_dir=tmp_path,
            device=torch.device("cpu"),
            grad_accum_steps=4,
            drop_partial_accum=True,
        )

    with pytest.raises(ValueError) as err:
        run(1)
    assert str(err.value) == (
        "3 batches per epoch and grad_accum_steps=4 with drop_partial_accum: no optimizer step would ever "
        "run (lower train.grad_accum_steps or train.batch_size)"
    )
    result = run(0)
    assert (result.epochs_run, result.resumed_from) == (0, 0) and math.isnan(result.last_loss)


@pytest.mark.parametrize("nan_from, where", [(7, "epoch 3, step 6"), (2, "epoch 1, step 1")])
def test_a_non_finite_loss_names_the_epoch_step_and_last_checkpoint(tiny_clip, tmp_path, nan_from, where):
    """3 batches per epoch: a NaN loss at the 7th batch stops in epoch 3 at step 6 and points at the
    checkpoint of epoch 2; at the 2nd batch there is no checkpoint yet, and the message says so."""
    module = _coop(tiny_clip)
    calls, plain_loss = [], module.loss

    def loss(logits, labels, **aux):
        calls.append(1)
        value = plain_loss(logits, labels, **aux)
        return value * float("nan") if len(calls) >= nan_from else value

    module.loss = loss
    feats, labels = _features(tiny_clip)
    with pytest.raises(FloatingPointError) as err:
        _train_features(module, feats, labels, epochs=4, run_dir=tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    assert str(err.value) == (
        f"non-finite loss (nan) at {where}: stopping before the update; the last good checkpoint is "
        f"{ckpt if nan_from == 7 else 'none yet'} (lower the learning rate, use amp=fp32 or set train.grad_clip)"
    )


def test_only_the_main_process_writes_checkpoints(tiny_clip, tmp_path, monkeypatch):
    """Under DDP every process trains, but only rank 0 writes the checkpoint (here: a rank that is not)."""
    monkeypatch.setattr(promptlab.distributed, "is_main", lambda: False)
    module = _coop(tiny_clip)
    feats, labels = _features(tiny_clip)
    result = _train_features(module, feats, labels, epochs=2, run_dir=tmp_path)
    assert result.epochs_run == 2 and not (tmp_path / "checkpoints").exists()


def test_each_step_averages_the_gradient_over_its_groups_samples(tiny_clip, tmp_path, monkeypatch):
    """Under DDP the gradient of each optimizer step is averaged over processes weighted by the samples
    each process saw in that accumulation group (a no-op in one process; test_ddp runs it for real):
    28 items in batches of 8, 8, 8, 4, accumulation 3, give two steps, of 24 and 4 samples."""
    calls = []
    monkeypatch.setattr(
        promptlab.distributed, "average_gradients", lambda params, n: calls.append((params, n))
    )
    module = _coop(tiny_clip)
    feats, labels = _features(tiny_clip, n=28)
    _train_features(module, feats, labels, shuffle=False, run_dir=tmp_path, grad_accum_steps=3)
    assert [n for _, n in calls] == [24, 4]
    assert all(len(p) == 1 and p[0] is module.ctx for p, _ in calls)


def _hook_over_loss(module: CoOp, **kw) -> list[float]:
    """Train one epoch (3 batches of 8); per batch, the loss the backward hook got over the step's loss."""
    losses, ratios = [], []
    plain_step, plain_backward = module.training_step, module.backward

    def step(inputs, labels):
        logits, loss = plain_step(inputs, labels)
        losses.append(loss.detach().float())
        return logits, loss

    def backward(loss):
        ratios.append(float(loss.detach().float() / losses[-1]))
        plain_backward(loss)

    module.training_step, module.backward = step, backward
    _train_features(module, *_features(module.clip), **kw)
    return ratios


@pytest.mark.parametrize("amp", ["fp32", "fp16"])
def test_the_backward_hook_gets_the_loss_over_the_accumulation_unscaled_off_cuda(tiny_clip, tmp_path, amp):
    """PromptModule.backward receives ``loss / grad_accum_steps``; loss scaling is for fp16 on CUDA only."""
    ratios = _hook_over_loss(
        _coop(tiny_clip), run_dir=tmp_path, device=torch.device("cpu"), amp=amp, grad_accum_steps=2
    )
    assert ratios == [0.5, 0.5, 0.5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device and fp16 loss scaling")
@pytest.mark.parametrize("amp", ["fp32", "fp16"])
def test_cuda_training_moves_the_batches_and_scales_fp16_losses(tmp_path, amp):
    """On CUDA the CPU batches are moved to the GPU (inputs and labels) and fp16 runs scale the loss by
    GradScaler's initial 2**16 before the backward hook (and unscale before clipping); fp32 runs do not
    (mutmut engine train 80-90, 157, 159, 163, 209: on a CPU-only machine these mutants change nothing)."""
    from promptlab.backbones import load_clip

    module = _coop(load_clip("tiny")).cuda()  # its own CLIP: the shared fixture stays on the CPU
    start = module.ctx.detach().clone()
    ratios = _hook_over_loss(module, run_dir=tmp_path, device=torch.device("cuda"), amp=amp, grad_clip=10.0)
    if amp == "fp16":  # a step with inf gradients halves the scale: only the first is certain
        assert ratios[0] == 2.0**16 and all(r >= 2.0**13 for r in ratios)
    else:
        assert ratios == [1.0] * 3
    assert module.ctx.device.type == "cuda" and not torch.equal(module.ctx, start)


def test_a_parameter_without_a_gradient_in_a_step_is_left_alone(tiny_clip, tmp_path):
    """Gradients are reset to None before each step, so a parameter that the step's loss does not reach
    (an expert MoCoOp did not route to) is skipped by the optimizer: momentum does not move it on."""
    module = _coop(tiny_clip)
    extra = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [module.ctx]}, {"params": [extra]}], lr=0.1, momentum=0.9)
    seen, plain_loss = [], module.loss

    def loss(logits, labels, **aux):
        seen.append(extra.detach().clone())
        value = plain_loss(logits, labels, **aux)
        return value + (extra**2).sum() if len(seen) == 1 else value  # extra in the first step only

    module.loss = loss
    _train_features(module, *_features(tiny_clip), opt=opt, run_dir=tmp_path)
    assert torch.equal(seen[1], torch.full((3,), 0.8))  # 1 - 0.1 * 2: the first step's gradient of extra**2
    assert torch.equal(seen[2], seen[1]) and torch.equal(extra.detach(), seen[1])


def test_the_step_budget_ends_the_run_in_the_epoch_it_is_spent(tiny_clip, tmp_path):
    """``max_steps=4`` with 3 batches an epoch: the budget runs out at the first batch of epoch 2, so the
    run ends there, with epoch 2's checkpoint (4 steps) and ``end_epoch`` called for epochs 1 and 2 only."""
    module = _coop(tiny_clip)
    ends, plain_end = [], module.end_epoch
    module.end_epoch = lambda epoch, epochs: ends.append((epoch, epochs)) or plain_end(epoch, epochs)
    _train_features(module, *_features(tiny_clip), epochs=4, run_dir=tmp_path, max_steps=4)
    assert ends == [(1, 4), (2, 4)] and _on_disk(tmp_path / "checkpoints" / "last.pt") == (2, 4)


def test_an_epoch_of_one_sample_scores_0_or_100_percent(tiny_clip, tmp_path):
    """The epoch's training accuracy is correct / seen, also when the epoch saw a single sample (labelled
    as the untrained module classifies it: 100 %)."""
    module = _coop(tiny_clip)
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
    feats = _features(tiny_clip, n=1)[0][:1]  # one view: the one the epoch draws
    with torch.no_grad():
        labels = module(image_features=feats[0]).argmax(-1)
    steps, writer = _steps_of(module, opt), _Writer()
    _train_features(module, feats, labels, opt=opt, run_dir=tmp_path, writer=writer)
    assert steps[0]["correct"] == 1 and ("train/epoch_accuracy", 100.0, 1) in writer.scalars
