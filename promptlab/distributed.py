"""Data-parallel training across processes (``torchrun``), without wrapping the method.

One large run (ImageNet, or a method whose image side trains) scales over GPUs with
``torchrun --nproc_per_node N -m promptlab.cli run RECIPE ...``. Every process draws the same
global batch from the same seeded generator and keeps its own contiguous slice of it
(:func:`shard_slice`); after ``backward`` the gradients are averaged over all processes, weighted
by each slice's size (:func:`average_gradients`). So N processes with a global batch B take
exactly the optimisation steps of one process with batch B (up to float summation order), which
the tests check on the CPU with the gloo backend.

Why not ``torch.nn.parallel.DistributedDataParallel``: the engine calls the method's own
``loss``, ``trainable_parameters`` and ``prompt_state_dict``, which a DDP wrapper hides behind
``.module``, and prompt learning has few, small trainable tensors, so DDP's bucketed overlap of
communication with ``backward`` buys little. One flat ``all_reduce`` per step is enough, and
methods with ``nn.ParameterList`` (MaPLe) need nothing special (unlike ``DataParallel``).

Only rank 0 writes files (checkpoints, logs, TensorBoard, metrics, prompts); every helper here
is a no-op in a single process, so the engine calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "ShardedBatchSampler",
    "all_finite",
    "all_sum",
    "average_gradients",
    "barrier",
    "current_shard",
    "init_from_env",
    "is_main",
    "main_first",
    "shard_slice",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and its local GPU index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call created the process group (and its caller should shut it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` in a single process."""
    if not _initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return current_shard()[0] == 0


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE`` > 1).

    Uses NCCL when the run is on CUDA and gloo otherwise (CPU, tests). Idempotent: a group that
    already exists is reused. Without ``WORLD_SIZE`` (a plain ``python`` launch) nothing happens.

    Args:
        device: the recipe's ``device``; ``auto`` or ``cuda*`` with CUDA present selects NCCL.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo()
    owns = not _initialized()
    if owns:
        cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world, dist.get_backend())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def shutdown() -> None:
    """Leave the process group (end of a run launched by ``torchrun``)."""
    if _initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """Under ``torchrun`` each process drives its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if info.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def barrier() -> None:
    if _initialized():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others.

    For work whose result is cached on disk (image features, few-shot draws): rank 0 computes
    and writes it; the other ranks then find it in the cache instead of all computing it at once.
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard_slice(n: int, shard: tuple[int, int]) -> slice:
    """The contiguous part of a global batch of ``n`` items that ``shard = (rank, world)`` keeps.

    Sizes differ by at most one (``torch.tensor_split``'s rule), so uneven batches (the last
    evaluation batch) are covered exactly once.
    """
    rank, world = shard
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (1 if rank < r else 0))


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_sum(*values: torch.Tensor | float) -> list[torch.Tensor]:
    """Sum tensors (or numbers) over all processes; returns float64 CPU tensors (copies in one process)."""
    flat = [torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values]
    if not _initialized():
        return flat
    shapes = [t.shape for t in flat]
    buf = torch.cat([t.reshape(-1) for t in flat]).to(_reduce_device())
    dist.all_reduce(buf)
    out, i = [], 0
    buf = buf.cpu()
    for s in shapes:
        k = int(torch.Size(s).numel())
        out.append(buf[i : i + k].reshape(s))
        i += k
    return out


def all_finite(loss: torch.Tensor) -> bool:
    """Is the loss finite on every process? (All ranks must stop together, or the others would hang.)"""
    ok = bool(torch.isfinite(loss.detach()).all())
    if not _initialized():
        return ok
    return bool(all_sum(float(not ok))[0].item() == 0)


def average_gradients(params: Sequence[torch.nn.Parameter], n_local: int) -> None:
    """Replace each gradient by the global-batch gradient: ``sum_r n_r * grad_r / sum_r n_r``.

    With a loss that is a mean over the process's ``n_local`` samples (plus terms that do not
    depend on the samples, e.g. KgCoOp's regulariser), this equals the gradient one process
    would get on the whole global batch. One flat ``all_reduce`` carries every gradient, the
    sample counts and a "has a gradient" flag per parameter, so a parameter that received no
    gradient on any process keeps ``grad = None`` (the optimizer then skips it, as it would in
    one process).
    """
    if not _initialized() or not params:
        return
    device = _reduce_device()
    chunks = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        chunks.append(g.detach().reshape(-1).to(device, torch.float32) * n_local)
    flags = torch.tensor([float(p.grad is not None) for p in params] + [float(n_local)], device=device)
    buf = torch.cat([*chunks, flags])
    dist.all_reduce(buf)
    total = sum(c.numel() for c in chunks)
    has_grad, n_global = buf[total : total + len(params)].tolist(), buf[-1]
    offset = 0
    for i, p in enumerate(params):
        k = p.numel()
        if has_grad[i] > 0:
            grad = (buf[offset : offset + k] / n_global).reshape(p.shape).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)
        offset += k


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This process's part of every global batch drawn by ``batch_sampler`` (empty parts are skipped).

    Every process builds the same ``batch_sampler`` (same seeded generator), so together they
    cover each global batch exactly once; with one process it yields the global batches.
    """

    def __init__(self, batch_sampler: torch.utils.data.Sampler, shard: tuple[int, int] = (0, 1)):
        self.batch_sampler, self.shard = batch_sampler, shard

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            part = batch[shard_slice(len(batch), self.shard)]
            if part:
                yield part


def sharded_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    generator: torch.Generator,
    *,
    shuffle: bool,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    drop_last: bool | None = None,
    **loader_kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A DataLoader over this process's part of every global batch, shuffled by ``generator``.

    The batch sampler is the one ``DataLoader(shuffle=...)`` would build (the last incomplete batch
    dropped when training, as Dassl's loader does, unless ``drop_last`` says otherwise), wrapped in
    :class:`ShardedBatchSampler`; the same ``generator`` seeds the workers' augmentation streams.
    """
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    if drop_last is None:  # Dassl: drop the last incomplete training batch when there is a full one
        drop_last = shuffle and len(dataset) >= batch_size
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = ShardedBatchSampler(BatchSampler(sampler, batch_size, drop_last), shard)
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, generator=generator, **loader_kwargs
    )
