"""Benchmark 3: evaluation throughput (test images/s, JPEG decode to accuracy) vs bare encode_image.

promptlab's evaluation of a frozen-image-side method encodes each test image once (DataLoader
workers decode and transform while the model runs) and classifies with text features computed
once. The bare figure is encode_image on tensors already in memory: the ceiling. Ratio >= 0.9
means evaluation costs little beyond the image tower itself.

    python benchmarks/bench_eval.py [--n 256] [--arch ViT-B-16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from common import add_runtime_args, classnames, runtime, synchronize
from PIL import Image

from promptlab.backbones import load_clip
from promptlab.data import Item
from promptlab.engine import FeatureBatches, evaluate
from promptlab.features import cached_features
from promptlab.methods import CoOp


def main() -> None:
    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rt = runtime(args)
    torch.manual_seed(0)
    clip = load_clip(
        open_clip.create_model(args.arch, pretrained=None),
        None,
        device=rt.device,
        precision=rt.model_precision,
    )
    module = CoOp(clip, classnames(100), n_ctx=16).to(rt.device)
    module.match_backbone_precision()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(args.n):
            p = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(p)
            items.append(Item(str(p), i % 100, "x"))
        tensors = torch.randn(args.n, 3, clip.image_size, clip.image_size).to(rt.device, clip.prompt_dtype)
        with torch.no_grad(), rt.autocast():
            clip.encode_image(tensors[:8])  # warm-up
            synchronize()
            t = time.perf_counter()
            for b in range(0, args.n, args.batch):
                clip.encode_image(tensors[b : b + args.batch])
            synchronize()
            bare = args.n / (time.perf_counter() - t)

        t = time.perf_counter()

        def encode(x: torch.Tensor) -> torch.Tensor:
            with rt.autocast():
                return module.encode_image(x.to(clip.prompt_dtype))

        feats = cached_features(
            encode,
            items,
            clip.eval_transform,
            fingerprint="bench",
            cache_dir=None,
            batch_size=args.batch,
            num_workers=args.workers,
            device=rt.device,
        )
        labels = torch.tensor([it.label for it in items])
        metrics = evaluate(
            module,
            FeatureBatches(feats, labels, args.batch, torch.Generator(), shuffle=False),
            device=rt.device,
            amp="bf16" if rt.precision == "bf16" else "fp32",
        )
        synchronize()
        ours = args.n / (time.perf_counter() - t)
    print(f"evaluation of {args.n} JPEG test images, {args.arch}, {rt.describe()}, {args.workers} workers")
    print(f"  bare encode_image on in-memory tensors: {bare:7.1f} images/s")
    print(f"  promptlab evaluate (decode+transform+encode+classify): {ours:7.1f} images/s (n={metrics['n']})")
    print(f"  ratio: {ours / bare:.2f}")


if __name__ == "__main__":
    main()
