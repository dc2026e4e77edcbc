"""The exact-protocol CoOp training step against its bound and against the reference (Dassl) step.

The exact protocol (``train.feature_cache: false``) draws a fresh RandomResizedCrop + flip of every
training image every epoch, so the image tower runs in every step. Three things are timed on the same
JPEG files (written to a temporary folder; ViT-B/16 with random weights; ``recipes/fewshot/coop_vit_b16``:
16 shots, 16 context tokens, batch 32, 37 classes, SGD):

  bound      one batch's decode + augmentation (one process) + image-tower forward, and nothing else:
             what a step costs at the least when its images go through the tower;
  promptlab  the full step through the run's own training path: the recipe's optimizer, the task's
             batches (DataLoader workers, decoded images kept in memory, pinned on CUDA), the lr schedule
             and ``engine.train`` (checkpoint every epoch), timed over the epochs after the first;
  reference  Dassl's CoOp step: a DataLoader that decodes every image every epoch, the text features of
             all classes at 77 tokens through open_clip's transformer, the image tower, backward, SGD.

    python benchmarks/bench_exact_step.py                       # the issue's sizes (a GPU: seconds)
    python benchmarks/bench_exact_step.py --classes 8 --shots 2 --batch 8 --epochs 3   # a CPU-sized check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    add_runtime_args,
    classnames,
    coop_loss,
    reference_text_features,
    runtime,
    synchronize,
    vit_b16,
)
from PIL import Image

from promptlab.config import instantiate, load_recipe
from promptlab.data import DatasetSplits, ImageDataset, Item
from promptlab.data.images import read_image
from promptlab.runner import _train, build_method
from promptlab.tasks import Classification

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fewshot" / "coop_vit_b16.yaml"


def write_jpegs(root: Path, n_classes: int, shots: int, size: tuple[int, int]) -> list[Item]:
    """``n_classes x shots`` JPEGs of natural-image statistics (smooth shapes plus grain), OxfordPets-sized."""
    rng = np.random.default_rng(0)
    w, h = size
    items = []
    for i in range(n_classes * shots):
        low = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        px = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (h, w, 3))
        path = root / f"{i:05d}.jpg"
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        items.append(Item(str(path), i % n_classes, f"class{i % n_classes}"))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runtime_args(ap)
    ap.add_argument("--classes", type=int, default=37)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="epochs run; the first is a warm-up, not timed")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the recipe's)")
    ap.add_argument("--image-size", default="500x375", help="WxH of the JPEGs (OxfordPets' typical size)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (the first is a warm-up)")
    rt = runtime(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.image_size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        items = write_jpegs(Path(tmp), args.classes, args.shots, size)
        overrides = [
            f"data.root={tmp}",
            f"output_dir={tmp}/run",
            f"cache_dir={tmp}/cache",
            f"device={rt.device}",
            f"model.precision={rt.model_precision}",
            f"train.amp={'bf16' if rt.precision == 'bf16' else 'fp32'}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
            f"shots={args.shots}",
        ] + ([f"data.num_workers={args.workers}"] if args.workers is not None else [])
        cfg = load_recipe(RECIPE, overrides, check_paths=False)
        names = classnames(args.classes)
        data = DatasetSplits("bench", items, [], [], names, "a photo of a {}.", shots=args.shots)
        clip = vit_b16(rt=rt)
        torch.manual_seed(1)
        module = build_method(cfg, clip, data).to(rt.device)
        module.match_backbone_precision()
        transform = clip.make_train_transform(cfg.data.crop_scale)
        steps = len(items) // args.batch
        print(
            f"exact-protocol CoOp step, ViT-B/16 (random weights), {args.classes} classes x {args.shots} shots, "
            f"batch {args.batch} ({steps} steps per epoch), {size[0]}x{size[1]} JPEGs, "
            f"{cfg.data.num_workers} loader workers, {rt.describe()}"
        )

        def bound(batch_items: list[Item]) -> tuple[float, float]:
            t = time.perf_counter()
            x = torch.stack([transform(read_image(it.path)) for it in batch_items])
            t_load = time.perf_counter() - t
            x = x.to(rt.device, clip.prompt_dtype)
            synchronize()
            t = time.perf_counter()
            with torch.no_grad(), rt.autocast():
                clip.encode_image(x)
            synchronize()
            return t_load, time.perf_counter() - t

        def bounds() -> list[tuple[float, float]]:
            return [bound(items[k * args.batch : (k + 1) * args.batch]) for k in range(min(steps, 3))]

        bound(items[: args.batch])  # warm-up
        measured = bounds()

        # promptlab: the runner's own training path, a timestamp at every step's start
        stamps: list[float] = []
        step_fn = module.training_step

        def stamped(inputs, labels):
            synchronize()
            stamps.append(time.perf_counter())
            return step_fn(inputs, labels)

        module.training_step = stamped
        g = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        _train(cfg, Classification(), data, module, rt.device, g, writer=None)
        synchronize()
        t_end = time.perf_counter()
        setup = stamps[0] - t0  # batches built (decoded images in memory) and the first batch loaded
        t_ours = (t_end - stamps[steps]) / (len(stamps) - steps)

        # the reference: Dassl's loader (decode every epoch), 77-token text of every class every step
        ref_module = build_method(cfg, clip, data).to(rt.device)
        ref_module.match_backbone_precision()
        opt = instantiate(cfg.optimizer, [ref_module.ctx], kind="optimizer")
        loader = torch.utils.data.DataLoader(
            ImageDataset(items, transform),
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            pin_memory=rt.device.type == "cuda",
        )
        ref_stamps = []
        for _ in range(args.epochs):
            for images, labels, _ in loader:
                synchronize()
                ref_stamps.append(time.perf_counter())
                images, labels = images.to(rt.device, clip.prompt_dtype), labels.to(rt.device)
                with torch.no_grad(), rt.autocast():
                    feats = clip.model.encode_image(images)
                with rt.autocast():
                    loss = coop_loss(
                        clip.logit_scale, reference_text_features(clip, ref_module), feats, labels
                    )
                opt.zero_grad()
                loss.backward()
                opt.step()
        synchronize()
        t_ref = (time.perf_counter() - ref_stamps[steps]) / (len(ref_stamps) - steps)
        measured += bounds()  # before and after: load drift shared by both sides of the ratio

    load = statistics.median(m[0] for m in measured)
    tower = statistics.median(m[1] for m in measured)
    t_bound = load + tower
    print(
        f"  bound     (decode + augment {load * 1e3:.0f} ms, 1 process; image tower {tower * 1e3:.0f} ms): "
        f"{t_bound * 1e3:8.0f} ms/step"
    )
    print(
        f"  promptlab (runner's training path, epochs 2-{args.epochs}):                      "
        f"{t_ours * 1e3:8.0f} ms/step   ({args.batch / t_ours:.1f} images/s; setup before the first step "
        f"{setup:.1f} s)"
    )
    print(
        f"  reference (Dassl: decode every epoch, 77-token text, tower, backward):    {t_ref * 1e3:8.0f} ms/step"
    )
    print(f"  bound / promptlab step: {t_bound / t_ours:.2f} (target >= 0.9)")
    print(f"  reference / promptlab step: {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    main()
