"""Benchmark 2: a whole 16-shot CoOp run (37 classes, 200 epochs) with the image tower in the loop.

promptlab: encode each training image once per augmented view (10 views) into the feature cache,
then train the text side on cached features with truncated, shared-prefix prompts.
Incumbent: every step re-encodes its images through the frozen image tower and runs 77-token prompts.
Both are measured on a few steps here (ViT-B/16 shapes, random weights, 224 px inputs) and projected
to the 200-epoch schedule: 592 images, batch 32 -> 18 steps per epoch.

    python benchmarks/bench_coop_run.py [--epochs 200] [--views 10] [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_runtime_args,
    classnames,
    coop_loss,
    median_time,
    reference_text_features,
    runtime,
    vit_b16,
)

from promptlab.methods import CoOp


def main() -> None:
    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    ap.add_argument("--classes", type=int, default=37)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rt = runtime(args)
    clip = vit_b16(rt=rt)
    torch.manual_seed(1)
    module = CoOp(clip, classnames(args.classes), n_ctx=16).to(rt.device)
    module.match_backbone_precision()
    images = torch.randn(args.batch, 3, 224, 224).to(rt.device, clip.prompt_dtype)
    labels = torch.randint(args.classes, (args.batch,)).to(rt.device)
    n_images = args.classes * args.shots
    steps = n_images // args.batch

    def encode():
        with torch.no_grad(), rt.autocast():
            return clip.encode_image(images)

    with rt.peak("image-tower batch"):
        t_encode = median_time(encode, args.repeats)  # one batch through the image tower
    feats = encode().detach()

    def our_step():
        module.ctx.grad = None
        with rt.autocast():
            loss = coop_loss(clip.logit_scale, module.text_features(), feats, labels)
        loss.backward()

    def ref_step():
        module.ctx.grad = None
        with torch.no_grad(), rt.autocast():
            f = clip.model.encode_image(images)  # the incumbent encodes every step
        with rt.autocast():
            loss = coop_loss(clip.logit_scale, reference_text_features(clip, module), f, labels)
        loss.backward()

    with rt.peak("promptlab text step"):
        t_ours = median_time(our_step, args.repeats)
    with rt.peak("incumbent step"):
        t_ref = median_time(ref_step, args.repeats)
    batches_to_cache = args.views * n_images / args.batch
    ours = batches_to_cache * t_encode + args.epochs * steps * t_ours
    ref = args.epochs * steps * t_ref
    print(
        f"16-shot CoOp, {args.classes} classes ({n_images} images), {args.epochs} epochs x {steps} steps, ViT-B/16, "
        f"{rt.describe()}"
    )
    print(
        f"  image tower: {t_encode / args.batch * 1000:.1f} ms/image; text step: promptlab {t_ours * 1000:.0f} ms, "
        f"incumbent step (encode + 77-token text) {t_ref * 1000:.0f} ms"
    )
    print(
        f"  promptlab: cache {batches_to_cache * t_encode / 60:.1f} min + training {args.epochs * steps * t_ours / 60:.1f} min "
        f"= {ours / 3600:.2f} h"
    )
    print(f"  incumbent: {ref / 3600:.2f} h")
    print(f"  speed-up (projected whole run): {ref / ours:.1f}x")


if __name__ == "__main__":
    main()
