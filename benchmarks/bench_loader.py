"""Input pipeline: images/s of promptlab's loader (workers, PIL decode, CLIP eval transform) vs raw decode.

Raw decode = a single-process loop of PIL open + RGB convert (no transform), the floor any loader
pays. The ratio says how much of that the full pipeline keeps (>1 when workers parallelise).

    python benchmarks/bench_loader.py [--n 512] [--size 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promptlab.data import ImageDataset, Item, make_loader
from promptlab.transforms import eval_transform


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(args.n):
            p = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(
                p, quality=90
            )
            items.append(Item(str(p), i % 10, f"c{i % 10}"))

        t = time.perf_counter()
        for it in items:
            with Image.open(it.path) as im:
                im.convert("RGB").load()
        raw = args.n / (time.perf_counter() - t)

        tf = eval_transform(224)
        t = time.perf_counter()
        for it in items:
            with Image.open(it.path) as im:
                tf(im)
        serial = args.n / (time.perf_counter() - t)

        loader = make_loader(
            ImageDataset(items, eval_transform(224)), args.batch, train=False, num_workers=args.workers
        )
        t = time.perf_counter()
        n = sum(x.shape[0] for x, _, _ in loader)
        ours = n / (time.perf_counter() - t)
    print(f"raw PIL decode (1 process):            {raw:8.1f} images/s")
    print(f"decode + eval transform (1 process):   {serial:8.1f} images/s")
    print(f"promptlab loader ({args.workers} workers, +transform): {ours:8.1f} images/s")
    print(
        f"ratio loader / raw decode: {ours / raw:.2f}; loader / serial decode+transform: {ours / serial:.2f} "
        f"(torch threads {torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
