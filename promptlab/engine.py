"""train() and evaluate(): one loop for every task, read top to bottom.

Precision, device, the learning-rate schedule, checkpoints, resume and NaN handling live here once,
for every method and every task (classification, video, anomaly detection, a user's own). What a
task changes sits behind three small contracts (see :mod:`promptlab.tasks`):

- **a batch** is ``(inputs, labels)``: ``inputs`` a dict of tensors (``images``; ``image_features``
  from the feature cache; clips under ``images`` for video; ``images`` and ``masks`` for anomaly
  detection), ``labels`` [B] (or [B, C] soft targets for mixup); the loop moves them to the device;
- **the loss** is the module's: :meth:`PromptModule.training_step(inputs, labels)
  <promptlab.prompts.PromptModule.training_step>` returns ``(logits, loss)``; the default is
  ``module(**inputs)`` and ``module.loss(logits, labels, **inputs)``;
- **the evaluator** (:class:`Evaluator`) ``observe``s each evaluation batch and returns the metrics:
  :class:`AccuracyEvaluator` (classification; multi-view video batches are classified the same way),
  ``promptlab.anomaly.evaluator.AnomalyEvaluator`` (per-category pixel / image metrics).
"""

from __future__ import annotations

import logging
import math
import pickle
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from promptlab import distributed
from promptlab.io import atomic_save_torch
from promptlab.prompts import PromptModule
from promptlab.runlog import progress

log = logging.getLogger(__name__)

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (inputs, labels); see the module docstring


# ---------------------------------------------------------------------- batches
class FeatureBatches:
    """Mini-batches of cached features [V, N, D]: each epoch draws one view per image, then shuffles.

    Dassl drops the last incomplete training batch when there is at least one full batch; so do we.
    Under DDP every process draws the same global batch and keeps its ``shard = (rank, world)`` part.
    """

    def __init__(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
    ):
        self.feats, self.labels, self.batch_size, self.g, self.shuffle = (
            feats,
            labels,
            batch_size,
            generator,
            shuffle,
        )
        self.shard = shard

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return (
            n // self.batch_size if self.shuffle and n >= self.batch_size else math.ceil(n / self.batch_size)
        )

    def __iter__(self) -> Iterator[Batch]:
        V, N = self.feats.shape[:2]
        view = torch.randint(V, (N,), generator=self.g) if V > 1 else torch.zeros(N, dtype=torch.long)
        order = torch.randperm(N, generator=self.g) if self.shuffle else torch.arange(N)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            idx = idx[
                distributed.shard_slice(len(idx), self.shard)
            ]  # this process's part of the global batch
            yield {"image_features": self.feats[view[idx], idx]}, self.labels[idx]


class ImageBatches:
    """Mini-batches of images through a DataLoader whose shuffling and augmentation follow ``generator``.

    The batch sampler is the one ``DataLoader(shuffle=...)`` builds itself, cut to this process's
    ``shard = (rank, world)`` part of each global batch under DDP.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        generator: torch.Generator,
        shuffle: bool = True,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
        drop_last: bool | None = None,
        pin_memory: bool = False,
    ):
        # drop_last None: Dassl's rule (the last short training batch dropped; see sharded_loader).
        # pin_memory: page-locked batches, so that the copy to the GPU overlaps the step (non_blocking)
        kw = dict(
            shuffle=shuffle, num_workers=num_workers, shard=shard, drop_last=drop_last, pin_memory=pin_memory
        )
        self.loader = distributed.sharded_loader(dataset, batch_size, generator, **kw)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, _ in self.loader:
            yield {"images": images}, labels


# ---------------------------------------------------------------------- schedule
#: The learning rate of each optimizer step: ``schedule(k)`` is the lr of the run's k-th step (0-based,
#: counted over the whole run, resumes included). Per-epoch schedules are the special case
#: ``per_epoch(fn, steps_per_epoch)``.
LRSchedule = Callable[[int], float]
SCHEDULES = ("dassl_cosine", "timm_cosine", "constant", "cosine")


def lr_at(
    epoch: int,
    base_lr: float,
    epochs: int,
    warmup_epochs: int = 0,
    warmup_lr: float = 1e-5,
    warmup_type: str = "constant",
) -> float:
    """Dassl's cosine schedule (stepped per epoch) behind a warm-up.

    During the ``warmup_epochs`` first epochs the lr is ``warmup_lr`` (constant, CoOp) or rises
    linearly to ``base_lr``; afterwards the cosine starts from ``base_lr`` as if the warm-up had not
    happened, exactly as Dassl's ConstantWarmupScheduler hands over to CosineAnnealingLR.
    """
    if epoch < warmup_epochs:
        if warmup_type == "linear":
            return warmup_lr + (base_lr - warmup_lr) * epoch / warmup_epochs
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def timm_cosine_lr(
    t: int, base_lr: float, t_initial: int, warmup_t: int, warmup_lr_init: float, lr_min: float
) -> float:
    """timm ``CosineLRScheduler``'s value at update ``t`` with ``cycle_limit=1``, ``warmup_prefix=False``.

    A linear warm-up from ``warmup_lr_init`` over ``warmup_t`` updates, then the cosine evaluated at the
    *absolute* ``t`` (it does not restart after the warm-up) from ``base_lr`` down to ``lr_min`` at
    ``t_initial``, and ``lr_min`` after it. Same arithmetic, in the same order, as timm's ``_get_lr``.
    """
    if t < warmup_t:
        return warmup_lr_init + t * ((base_lr - warmup_lr_init) / warmup_t)
    if t >= t_initial:  # past the single cycle
        return lr_min
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * t / t_initial))


def steps_per_epoch(batches_per_epoch: int, accum: int, drop_partial: bool) -> int:
    """Optimizer steps in an epoch of ``batches_per_epoch`` batches accumulated ``accum`` at a time;
    the epoch's last, shorter group steps too unless ``drop_partial`` (then its gradient is discarded)."""
    accum = max(1, accum)
    return batches_per_epoch // accum if drop_partial else math.ceil(batches_per_epoch / accum)


def per_epoch(lr_of_epoch: Callable[[int], float], steps_in_epoch: int) -> LRSchedule:
    """A per-epoch schedule (one lr for every step of an epoch) as a function of the optimizer step."""
    n = max(1, steps_in_epoch)
    return lambda step: lr_of_epoch(step // n)


def make_schedule(
    kind: str,
    *,
    base_lr: float,
    epochs: int,
    batches_per_epoch: int,
    accum: int = 1,
    drop_partial: bool = False,
    warmup_epochs: int = 0,
    warmup_lr: float = 1e-5,
    warmup_type: str = "constant",
    min_lr_ratio: float = 0.0,
    max_steps: int | None = None,
) -> LRSchedule:
    """The lr of each optimizer step for a recipe's ``train`` section.

    - ``cosine``: torch's ``CosineAnnealingLR`` stepped after every optimizer step, over the run's
      steps (``max_steps`` when the run is cut there), from ``base_lr`` to ``min_lr_ratio x base_lr``;
      no warm-up (Tip-Adapter-F ``main.py``, CLIP-LoRA ``lora.py``: ``T_max`` = total iterations).

    - ``dassl_cosine``: :func:`lr_at`, one value per epoch (CoOp and the Dassl forks).
    - ``constant``: ``base_lr`` after the warm-up (AnomalyCLIP's train.py: no scheduler).
    - ``timm_cosine``: ViFi-CLIP's ``utils/optimizer.py``: timm's CosineLRScheduler over
      ``epochs x batches_per_epoch`` iterations (``warmup_epochs x batches_per_epoch`` of linear warm-up
      from ``warmup_lr``, floor ``min_lr_ratio x base_lr``), stepped with ``step_update(epoch *
      batches_per_epoch + idx)`` after each optimizer step, i.e. at the index of the step's last batch.
      So a step uses the value set after the *previous* step (the first one the scheduler's initial
      value); under accumulation the iteration count, not the step count, is the clock
      (ViFi-CLIP ``main.py`` train_one_epoch).
    """
    if kind == "cosine":
        if warmup_epochs > 0:
            raise ValueError("train.lr_schedule=cosine has no warm-up: set train.warmup_epochs=0")
        total = max(1, max_steps or epochs * steps_per_epoch(batches_per_epoch, accum, drop_partial))
        lr_min = base_lr * min_lr_ratio
        return lambda step: lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * step / total))
    if kind == "dassl_cosine":
        return per_epoch(
            lambda e: lr_at(e, base_lr, epochs, warmup_epochs, warmup_lr, warmup_type),
            steps_per_epoch(batches_per_epoch, accum, drop_partial),
        )
    if kind == "constant":  # after the warm-up, base_lr throughout (AnomalyCLIP's Adam)
        return per_epoch(
            lambda e: (
                lr_at(e, base_lr, epochs, warmup_epochs, warmup_lr, warmup_type)
                if e < warmup_epochs
                else base_lr
            ),
            steps_per_epoch(batches_per_epoch, accum, drop_partial),
        )
    if kind != "timm_cosine":
        raise ValueError(f"lr schedule {kind!r}: expected one of {SCHEDULES}")
    if warmup_type != "linear" and warmup_epochs > 0:
        raise ValueError("train.lr_schedule=timm_cosine warms up linearly: set train.warmup_type=linear")
    accum, n = max(1, accum), batches_per_epoch
    per = steps_per_epoch(n, accum, drop_partial)
    t_initial, warmup_t = int(epochs * n), int(warmup_epochs * n)  # timm's t_initial, warmup_t

    def value(t: int) -> float:
        return timm_cosine_lr(t, base_lr, t_initial, warmup_t, warmup_lr, base_lr * min_lr_ratio)

    def last_batch(step: int) -> int:  # iteration index of the last batch of optimizer step `step`
        e, j = divmod(step, max(1, per))
        return e * n + min(n, (j + 1) * accum) - 1

    first = warmup_lr if warmup_t > 0 else base_lr  # the lr timm's scheduler sets when it is built
    return lambda step: first if step == 0 else value(last_batch(step - 1))


# ---------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, as Dassl's set_random_seed does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str):
    """bf16 / fp16 autocast set once for the whole loop; fp32 runs without it."""
    if amp == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG's state as tensors and plain data, so the checkpoint loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", uint32[624], int, int, float)
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "random": random.getstate(),  # (version, tuple of ints, None)
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    npr = state["numpy"]
    keys = npr["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npr["pos"], npr["has_gauss"], npr["cached_gaussian"]))
    random.setstate(state["random"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: Path,
    module: PromptModule,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    generator: torch.Generator,
    step: int = 0,
) -> None:
    """Atomically write what ``restore_training_state`` needs to continue exactly: learned tensors,
    optimizer, RNGs, and the optimizer steps taken (the schedule's clock)."""
    atomic_save_torch(
        {
            "prompt_state": module.prompt_state_dict(),
            "method_state": module.training_state_dict(),  # what end_epoch carries across epochs
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "rng": _rng_state(generator),
        },
        path,
    )


def restore_training_state(
    path: Path, module: PromptModule, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[int, int | None]:
    """Load a checkpoint written by :func:`save_training_state`; returns (epochs done, optimizer steps
    done), the steps ``None`` for a checkpoint from before they were recorded."""
    ckpt = load_checkpoint(path)
    module.load_prompt_state_dict(ckpt["prompt_state"], source=str(path))
    module.load_training_state_dict(ckpt.get("method_state", {}))
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"], generator)
    return int(ckpt["epoch"]), (int(ckpt["step"]) if "step" in ckpt else None)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``, saying which file failed.

    Checkpoints hold tensors and plain data only (see :func:`_rng_state`), so the restricted
    unpickler reads them and a hostile file cannot run code. A file that needs more (written by
    something else, or by an older promptlab that kept the numpy RNG state as a numpy array) is refused.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"cannot read checkpoint {path}: it holds objects other than tensors and plain data ({first}); "
            "it is not unpickled in full because that can run code. If it is an older promptlab checkpoint, "
            "delete it to restart the run from scratch"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same actionable message
        raise RuntimeError(
            f"cannot read checkpoint {path}: {e}; delete it to restart the run from scratch"
        ) from e


@dataclass
class TrainResult:
    epochs_run: int
    last_loss: float
    resumed_from: int


# ---------------------------------------------------------------------- train
def train(
    module: PromptModule,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    lr_schedule: LRSchedule,
    generator: torch.Generator,
    run_dir: Path,
    device: torch.device,
    amp: str = "fp32",
    grad_clip: float | None = None,
    checkpoint_every: int = 1,
    log_every: int = 20,
    resume: bool = False,
    writer: Any = None,
    grad_accum_steps: int = 1,
    drop_partial_accum: bool = False,
    profile_steps: int = 0,
    max_steps: int | None = None,
) -> TrainResult:
    """Train the method's learnable tensors for ``epochs`` epochs; the last epoch's model is kept.

    Checkpoints (``run_dir/checkpoints/last.pt``) are written atomically after every
    ``checkpoint_every`` epochs and at the end; with ``resume`` the loop restores the learned
    tensors, optimizer and every RNG and continues, ending with the same numbers as an
    uninterrupted run. A non-finite loss stops the run before the step is applied, so the
    last good checkpoint survives. Under ``torchrun`` (see :mod:`promptlab.distributed`) each
    process trains on its part of every global batch, gradients are averaged over processes,
    and only rank 0 writes checkpoints. With ``grad_accum_steps = N`` the optimizer steps once per N
    batches on their mean gradient; the epoch's last, shorter group steps too, unless
    ``drop_partial_accum`` (ViFi-CLIP: its gradient is zeroed at the next epoch's start, so those
    batches are skipped). Before every optimizer step each parameter group's lr is set to
    ``lr_schedule(k)``, k the optimizer steps taken so far in the run (kept across resumes). With
    ``max_steps`` the run ends after that many optimizer steps, inside an epoch if need be (CLIP-LoRA
    counts iterations, not epochs).
    """
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    accum = max(1, int(grad_accum_steps))
    n_batches = len(batches)
    # batches that end in an optimizer step; the rest (a dropped partial group) are skipped
    used = steps_per_epoch(n_batches, accum, drop_partial_accum) * accum if drop_partial_accum else n_batches
    if used == 0 and epochs > 0:
        raise ValueError(
            f"{n_batches} batches per epoch and grad_accum_steps={accum} with drop_partial_accum: no optimizer "
            "step would ever run (lower train.grad_accum_steps or train.batch_size)"
        )
    start, opt_step = 0, 0  # epochs done, optimizer steps done
    if resume and ckpt_path.exists():
        start, saved_step = restore_training_state(ckpt_path, module, optimizer, generator)
        opt_step = saved_step if saved_step is not None else start * steps_per_epoch(n_batches, accum, False)
        log.info("resumed from %s at epoch %d/%d (optimizer step %d)", ckpt_path, start, epochs, opt_step)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")
    params = module.trainable_parameters()
    step, loss_value, n_local, lr = start * n_batches, float("nan"), 0, lr_schedule(opt_step)
    module.train()
    prof = _Profiler(profile_steps)
    # each epoch logs a line: off a terminal the epoch loop needs no lines of its own
    for epoch in progress(range(start, epochs), "epochs", initial=start, total=epochs, plain_lines=False):
        correct = seen = 0
        for i, (inputs, labels) in enumerate(progress(batches, f"epoch {epoch + 1}", leave=False)):
            if i >= used or (max_steps is not None and i % accum == 0 and opt_step >= max_steps):
                break  # ViFi-CLIP's discarded partial accumulation group, or the step budget spent
            if i % accum == 0:  # the lr of the optimizer step this accumulation group ends in
                lr = lr_schedule(opt_step)
                for group in optimizer.param_groups:  # a group may run at a fixed fraction of the schedule
                    group["lr"] = lr * group.get("lr_scale", 1.0)
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            labels = labels.to(device)
            with autocast(device, amp):
                logits, loss = module.training_step(inputs, labels)  # the loss is the module's
            if not distributed.all_finite(loss):  # DDP: every process stops, none waits for the others
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step}: stopping before the "
                    f"update; the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'} "
                    "(lower the learning rate, use amp=fp32 or set train.grad_clip)"
                )
            if i % accum == 0:  # first batch of an accumulation group
                optimizer.zero_grad(set_to_none=True)
                n_local = 0
            module.backward(scaler.scale(loss / accum))  # the method's gradient hook (default: .backward())
            n_local += labels.numel()
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                distributed.average_gradients(
                    params, n_local
                )  # DDP: the global batch's gradient; no-op in one process
                if grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                scaler.step(optimizer)
                scaler.update()
                opt_step += 1
            loss_value = loss.item()
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += labels.numel()
            prof.step()
            if writer is not None and step % log_every == 0:
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/lr", lr, step)
            step += 1
        correct, seen = (int(v) for v in distributed.all_sum(correct, seen))
        acc = 100.0 * correct / max(seen, 1)
        log.info("epoch %d/%d  lr %.3g  loss %.4f  train acc %.2f", epoch + 1, epochs, lr, loss_value, acc)
        if writer is not None:
            writer.add_scalar("train/epoch_accuracy", acc, epoch + 1)
            writer.add_scalar("train/epoch_lr", lr, epoch + 1)
        module.end_epoch(epoch + 1, epochs)  # per-epoch method state (PromptSRC's prompt averaging)
        done = max_steps is not None and opt_step >= max_steps
        if distributed.is_main() and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or done):
            save_training_state(ckpt_path, module, optimizer, epoch + 1, generator, opt_step)
        if done:
            break
    prof.stop()
    module.eval()
    return TrainResult(epochs_run=epochs - start, last_loss=loss_value, resumed_from=start)


class _Profiler:
    """``promptlab run --profile``: torch.profiler over a few training steps, then a table of where time went."""

    def __init__(self, steps: int):
        self.prof = None
        if steps > 0:
            sched = torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1)
            self.prof = torch.profiler.profile(schedule=sched, on_trace_ready=self._report)
            self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    @staticmethod
    def _report(prof: torch.profiler.profile) -> None:
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25)
        log.info("profile of the training steps (per operator, sorted by self time):\n%s", table)
        print(table)


# ---------------------------------------------------------------------- evaluate
class Evaluator(Protocol):
    """What :func:`evaluate` asks of a task: ``observe`` every batch (inputs on the device, labels on
    the CPU; under ``torch.no_grad`` with the text features cached), then ``result`` the metrics."""

    def observe(
        self, module: PromptModule, inputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> None: ...

    def result(self) -> dict[str, Any]: ...


class AccuracyEvaluator:
    """Top-1 accuracy and mean per-class accuracy (in %) over every process's batches."""

    def __init__(self, num_classes: int):
        self.hits = torch.zeros(num_classes)
        self.counts = torch.zeros(num_classes)

    def observe(self, module: PromptModule, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        logits = module(**inputs)
        module.observe_eval(logits, labels)
        ok = (logits.argmax(-1).cpu() == labels).float()
        self.hits.index_add_(0, labels, ok)
        self.counts.index_add_(0, labels, torch.ones_like(ok))

    def result(self) -> dict[str, Any]:
        hits, counts = distributed.all_sum(self.hits, self.counts)  # DDP: each process saw a part
        present = counts > 0
        return {
            "accuracy": float(100.0 * hits.sum() / counts.sum().clamp(min=1)),
            "mean_per_class_accuracy": float(100.0 * (hits[present] / counts[present]).mean())
            if present.any()
            else 0.0,
            "n": int(counts.sum()),
        }


def evaluate(
    module: PromptModule,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    amp: str = "fp32",
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """The evaluator's metrics (default: :class:`AccuracyEvaluator`), with text features computed once.

    Batches that drop unreadable files (``skipped``: their paths) add ``skipped: {count, files}``, so a
    smaller ``n`` is never silent; a method's own statistics (``end_eval``) come as ``method_stats``.
    """
    with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
        module.eval()
        evaluator = evaluator if evaluator is not None else AccuracyEvaluator(len(module.classnames))
        module.begin_eval()
        with module.cached_text_features(), autocast(device, amp):
            for inputs, labels in progress(batches, "evaluate", leave=False):
                if labels.numel() == 0:  # DDP: a process's part of the last, small batch
                    continue
                evaluator.observe(module, {k: v.to(device) for k, v in inputs.items()}, labels)
        out = evaluator.result()
        skipped = getattr(batches, "skipped", None)  # unreadable files the batches dropped (VideoBatches)
        if skipped is not None:
            (n_skipped,) = distributed.all_sum(len(skipped))
            out["skipped"] = {"count": int(n_skipped), "files": sorted(set(skipped))}  # files: this process's
            if skipped:
                log.warning(
                    "evaluation skipped %d unreadable file(s); n=%d counts the others", len(skipped), out["n"]
                )
        stats = module.end_eval()
        if stats:
            out["method_stats"] = stats
        return out
