"""Resume and DDP for methods that train the image side, on image and clip batches.

``test_engine`` / ``test_ddp`` pin resume and DDP for CoOp on cached features. Here the image tower
itself carries learned tensors (IVLP and MaPLe prompts, ViFi-CLIP's prompt stage) or learns outright
(ViFi-CLIP's bridge stage tunes the towers, with AdamW and mixed clip batches), so every step runs the
tiny CLIP's image tower on pixels:
- a run killed in the middle of an epoch and resumed from its checkpoint ends bit-identical to an
  uninterrupted one (learned tensors, optimizer state and every RNG restored: the batches' order,
  the augmentation noise drawn from torch's global RNG, the mixup draws);
- 2 CPU processes (gloo) with a global batch B take the steps of 1 process with batch B.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from promptlab import distributed
from promptlab.backbones import load_clip
from promptlab.engine import ImageBatches, lr_at, per_epoch, train
from promptlab.methods import IVLP, MaPLe, ViFiCLIP
from promptlab.prompts import PromptModule
from promptlab.video.data import VideoBatches

CLASSES = ["red circle", "blue square", "green star"]
N_ITEMS, BATCH, EPOCHS, FRAMES = 8, 4, 3, 2


class Pixels(Dataset):
    """Fixed random images [3, 32, 32] (or clips [T, 3, 32, 32]); ``augment`` adds noise and a flip drawn
    from torch's global RNG, the way torchvision's random transforms draw theirs."""

    def __init__(self, frames: int = 0, augment: bool = False, clip_tuple: bool = False):
        shape = (N_ITEMS, frames, 3, 32, 32) if frames else (N_ITEMS, 3, 32, 32)
        self.x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        self.y = torch.arange(N_ITEMS) % len(CLASSES)
        self.augment, self.clip_tuple = augment, clip_tuple

    def __len__(self) -> int:
        return N_ITEMS

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            x = x + 0.3 * torch.randn(x.shape)
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        # VideoDataset's samples carry the path of an unreadable video last (None: read fine)
        return (x, int(self.y[i]), i, None) if self.clip_tuple else (x, int(self.y[i]), i)


def _ivlp(clip):
    return IVLP(clip, CLASSES, n_ctx_text=2, n_ctx_vision=2, prompt_depth_text=2, prompt_depth_vision=2)


def _maple(clip):
    return MaPLe(clip, CLASSES, n_ctx=2, prompt_depth=2)


def _vifi_prompt(clip):
    return ViFiCLIP(
        clip,
        CLASSES,
        stage="prompt",
        n_ctx_text=2,
        n_ctx_vision=2,
        prompt_depth_text=2,
        prompt_depth_vision=2,
    )


def _vifi_bridge(clip):
    return ViFiCLIP(clip, CLASSES, stage="bridge", tune="both")


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)


# name -> (module factory, optimizer, batches factory (dataset args, mixup))
CASES: dict[str, tuple[Callable, Callable, str]] = {
    "ivlp-images": (_ivlp, _sgd, "images"),
    "maple-images": (_maple, _sgd, "images"),
    "vificlip_prompt-images": (_vifi_prompt, _sgd, "images"),
    "vificlip_bridge-clips": (_vifi_bridge, _adamw, "clips"),
}


def _batches(kind: str, g: torch.Generator, shard: tuple[int, int], augment: bool):
    if kind == "images":
        return ImageBatches(Pixels(augment=augment), BATCH, g, shard=shard)
    # clips through the video loader; mixup (its draws from ``g``) only in one process: under DDP each
    # process mixes its own part of the batch, as timm's mixup does, so it cannot equal one process
    mixup = 0.8 if shard == (0, 1) and augment else 0.0
    data = Pixels(frames=FRAMES, augment=augment, clip_tuple=True)
    return VideoBatches(data, BATCH, g, shard=shard, num_classes=len(CLASSES), mixup=mixup)


class _KilledAt:
    """Batches that raise KeyboardInterrupt before global batch ``at`` (a run killed mid-epoch)."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.seen = inner, at, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for b in self.inner:
            if self.seen == self.at:
                raise KeyboardInterrupt
            self.seen += 1
            yield b


def _train(
    case: str,
    run_dir: Path,
    *,
    shard: tuple[int, int] = (0, 1),
    augment: bool = True,
    resume: bool = False,
    kill_at: int | None = None,
    sgd: bool = False,
) -> dict[str, torch.Tensor]:
    """A fresh tiny CLIP and module (seed 0), EPOCHS epochs; returns copies of the learned tensors."""
    make, optim, kind = CASES[case]
    optim = _sgd if sgd else optim
    torch.manual_seed(0)
    module: PromptModule = make(load_clip("tiny"))
    g = torch.Generator().manual_seed(1)
    batches = _batches(kind, g, shard, augment)
    if kill_at is not None:
        batches = _KilledAt(batches, kill_at)
    torch.manual_seed(1234)  # what a fresh process would hold; a resumed run must restore the RNGs itself
    train(
        module,
        batches,
        optim(module.trainable_parameters()),
        epochs=EPOCHS,
        lr_schedule=per_epoch(lambda e: lr_at(e, 1.0, EPOCHS, 1, 0.1), len(batches)),  # Dassl's, per epoch
        generator=g,
        run_dir=run_dir,
        device=torch.device("cpu"),
        resume=resume,
    )
    return {k: v.detach().clone() for k, v in module.prompt_state_dict().items()}


def _initial(case: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = CASES[case][0](load_clip("tiny"))
    return {k: v.detach().clone() for k, v in module.prompt_state_dict().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(case: str, tmp_path: Path) -> None:
    full = _train(case, tmp_path / "full")
    per_epoch = N_ITEMS // BATCH
    with pytest.raises(KeyboardInterrupt):  # killed after 1 epoch and 1 batch: the checkpoint is epoch 1
        _train(case, tmp_path / "cut", kill_at=per_epoch + 1)
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    resumed = _train(case, tmp_path / "cut", resume=True)
    init = _initial(case)
    assert set(resumed) == set(full) == set(init)
    assert max(float((full[k] - init[k]).abs().max()) for k in full) > 1e-3  # training moved the tensors
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        out = {
            case: _train(
                case,
                Path(tmp) / f"{case}-rank{rank}",
                shard=distributed.current_shard(),
                augment=False,
                sgd=True,
            )
            for case in sorted(CASES)
        }
        torch.save(out, Path(tmp) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    """Deterministic pixels (no augmentation: each process draws its own augmentation stream by design),
    and SGD for every method: Adam divides the gradient by its own scale, so it would hide a gradient
    summed instead of averaged over processes, and it magnifies float summation noise."""
    one = {case: _train(case, tmp_path / f"{case}-single", augment=False, sgd=True) for case in sorted(CASES)}
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2))
    for case in sorted(CASES):
        init = _initial(case)
        moved = max(float((one[case][k] - init[k]).abs().max()) for k in init)
        assert moved > 1e-3, case
        for k in init:
            torch.testing.assert_close(r1[case][k], r0[case][k], rtol=0, atol=0, msg=f"{case} {k}")
            scale = float(one[case][k].abs().max())
            torch.testing.assert_close(
                r0[case][k], one[case][k], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=f"{case} {k}"
            )
        assert (tmp_path / f"{case}-rank0" / "checkpoints" / "last.pt").is_file()
        assert not (tmp_path / f"{case}-rank1" / "checkpoints").exists()  # only rank 0 writes
