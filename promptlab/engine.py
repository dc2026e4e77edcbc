"""train() and evaluate(): one loop, read top to bottom.

Precision, device, the learning-rate schedule, checkpoints, resume and NaN handling live here once,
for every method. Batches come either from cached image features (``{"image_features": ...}``) or
from images (``{"images": ...}``); the loop does not care which.
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
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from promptlab import distributed
from promptlab.io import atomic_save_torch
from promptlab.prompts import PromptModule
from promptlab.runlog import progress

log = logging.getLogger(__name__)

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (forward kwargs, labels)


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
    ):
        self.loader = distributed.sharded_loader(
            dataset, batch_size, generator, shuffle=shuffle, num_workers=num_workers, shard=shard
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, _ in self.loader:
            yield {"images": images}, labels


# ---------------------------------------------------------------------- schedule
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
    path: Path, module: PromptModule, optimizer: torch.optim.Optimizer, epoch: int, generator: torch.Generator
) -> None:
    """Atomically write what ``restore_training_state`` needs to continue exactly: learned tensors, optimizer, RNGs."""
    atomic_save_torch(
        {
            "prompt_state": module.prompt_state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "rng": _rng_state(generator),
        },
        path,
    )


def restore_training_state(
    path: Path, module: PromptModule, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> int:
    """Load a checkpoint written by :func:`save_training_state`; returns the number of epochs already done."""
    ckpt = load_checkpoint(path)
    module.load_prompt_state_dict(ckpt["prompt_state"], source=str(path))
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"], generator)
    return int(ckpt["epoch"])


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
    lr_fn: Callable[[int], float],
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
    profile_steps: int = 0,
) -> TrainResult:
    """Train the method's learnable tensors for ``epochs`` epochs; the last epoch's model is kept.

    Checkpoints (``run_dir/checkpoints/last.pt``) are written atomically after every
    ``checkpoint_every`` epochs and at the end; with ``resume`` the loop restores the learned
    tensors, optimizer and every RNG and continues, ending with the same numbers as an
    uninterrupted run. A non-finite loss stops the run before the step is applied, so the
    last good checkpoint survives. Under ``torchrun`` (see :mod:`promptlab.distributed`) each
    process trains on its part of every global batch, gradients are averaged over processes,
    and only rank 0 writes checkpoints. With ``grad_accum_steps = N`` the optimizer steps once per N
    batches on their mean gradient (the epoch's last, shorter group steps too).
    """
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    start = 0
    if resume and ckpt_path.exists():
        start = restore_training_state(ckpt_path, module, optimizer, generator)
        log.info("resumed from %s at epoch %d/%d", ckpt_path, start, epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")
    params = module.trainable_parameters()
    accum = max(1, int(grad_accum_steps))
    step, loss_value, n_local = start * len(batches), float("nan"), 0
    module.train()
    prof = _Profiler(profile_steps)
    # each epoch logs a line: off a terminal the epoch loop needs no lines of its own
    for epoch in progress(range(start, epochs), "epochs", initial=start, total=epochs, plain_lines=False):
        lr = lr_fn(epoch)
        for group in optimizer.param_groups:  # a group may run at a fixed fraction of the schedule
            group["lr"] = lr * group.get("lr_scale", 1.0)
        correct = seen = 0
        for i, (inputs, labels) in enumerate(progress(batches, f"epoch {epoch + 1}", leave=False)):
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            labels = labels.to(device)
            with autocast(device, amp):
                logits = module(**inputs)
                loss = module.loss(logits, labels, **inputs)
            if not distributed.all_finite(loss):  # DDP: every process stops, none waits for the others
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step}: stopping before the "
                    f"update; the last good checkpoint is {ckpt_path if ckpt_path.exists() else 'none yet'} "
                    "(lower the learning rate, use amp=fp32 or set train.grad_clip)"
                )
            if i % accum == 0:  # first batch of an accumulation group
                optimizer.zero_grad(set_to_none=True)
                n_local = 0
            scaler.scale(loss / accum).backward()
            n_local += labels.numel()
            if (i + 1) % accum == 0 or i + 1 == len(batches):
                distributed.average_gradients(
                    params, n_local
                )  # DDP: the global batch's gradient; no-op in one process
                if grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                scaler.step(optimizer)
                scaler.update()
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
        if distributed.is_main() and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
            save_training_state(ckpt_path, module, optimizer, epoch + 1, generator)
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
@torch.no_grad()
def evaluate(
    module: PromptModule, batches: Iterable[Batch], *, device: torch.device, amp: str = "fp32"
) -> dict[str, Any]:
    """Top-1 accuracy and mean per-class accuracy (in %), with text features computed once."""
    module.eval()
    n_cls = len(module.classnames)
    hits = torch.zeros(n_cls)
    counts = torch.zeros(n_cls)
    module.begin_eval()
    with module.cached_text_features(), autocast(device, amp):
        for inputs, labels in progress(batches, "evaluate", leave=False):
            if labels.numel() == 0:  # DDP: a process's part of the last, small batch
                continue
            logits = module(**{k: v.to(device) for k, v in inputs.items()})
            module.observe_eval(logits, labels)
            ok = (logits.argmax(-1).cpu() == labels).float()
            hits.index_add_(0, labels, ok)
            counts.index_add_(0, labels, torch.ones_like(ok))
    hits, counts = distributed.all_sum(hits, counts)  # DDP: each process saw a part of the test set
    present = counts > 0
    out: dict[str, Any] = {
        "accuracy": float(100.0 * hits.sum() / counts.sum().clamp(min=1)),
        "mean_per_class_accuracy": float(100.0 * (hits[present] / counts[present]).mean())
        if present.any()
        else 0.0,
        "n": int(counts.sum()),
    }
    stats = module.end_eval()
    if stats:
        out["method_stats"] = stats
    return out
