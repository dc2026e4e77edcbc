"""Clips per second of the video loader (PyAV files vs frame folders) and of a ViFi-CLIP training step.

Writes a few real videos (MPEG-4, 320x240, 10 s at 25 fps, like a UCF101 clip) and the same frames as
JPEG folders into a temporary folder, then times one pass of ``VideoBatches`` over them (T frames per
clip, the training augmentation at 224 px) and bridge / prompt training steps of a CLIP.

    python benchmarks/bench_video.py                   # tiny CLIP steps, 8 frames
    python benchmarks/bench_video.py --vit --frames 8  # ViT-B/16-shaped CLIP (random weights): slow on a CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from promptlab.clip import load_clip
from promptlab.data import Item
from promptlab.methods import ViFiCLIP
from promptlab.video.data import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, VideoBatches, VideoDataset


def write_clip(path: Path, frames_dir: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    frames_dir.mkdir(parents=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for i in range(n):
            img = np.roll(base, 3 * i, axis=1)  # moving texture
            Image.fromarray(img).save(frames_dir / f"img_{i + 1:05d}.jpg", quality=90)
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode())


def loader_rate(items: list[Item], frames: int, size: int, workers: int) -> float:
    t = ClipTransform(size, IMAGENET_MEAN, IMAGENET_STD, train=True)
    batches = VideoBatches(VideoDataset(items, frames, t), 2, torch.Generator().manual_seed(0), num_workers=workers)
    start, n = time.perf_counter(), 0
    for _, labels in batches:
        n += labels.numel()
    return n / (time.perf_counter() - start)


def step_rate(stage: str, vit: bool, frames: int, batch: int, steps: int = 3) -> float:
    clip = load_clip("ViT-B-16") if vit else load_clip("tiny")
    kw = {} if vit or stage == "bridge" else {"prompt_depth_text": 2, "prompt_depth_vision": 2}
    m = ViFiCLIP(clip, [f"class {i}" for i in range(101)], stage=stage, **kw)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-6)
    x = torch.randn(batch, frames, 3, clip.image_size, clip.image_size)
    y = torch.arange(batch) % 101
    m.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()  # the first step warms up
        opt.zero_grad()
        m.loss(m(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--vit", action="store_true", help="time steps on a ViT-B/16-shaped CLIP")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files, folders = [], []
        for i in range(args.videos):
            write_clip(Path(tmp) / f"v{i}.avi", Path(tmp) / f"v{i}", 250, i)
            files.append(Item(str(Path(tmp) / f"v{i}.avi"), i % 2, "x"))
            folders.append(Item(str(Path(tmp) / f"v{i}"), i % 2, "x"))
        f_rate = loader_rate(files, args.frames, 224, args.workers)
        d_rate = loader_rate(folders, args.frames, 224, args.workers)
    print(f"loader, T={args.frames}, 224 px train augmentation, {args.workers} workers, 250-frame 320x240 videos:")
    print(f"  PyAV video files : {f_rate:7.2f} clips/s")
    print(f"  JPEG frame folder: {d_rate:7.2f} clips/s   (folder / file = {d_rate / f_rate:.2f}x)")
    name = "ViT-B/16-shaped CLIP" if args.vit else "tiny CLIP"
    b = step_rate("bridge", args.vit, args.frames, 2)
    p = step_rate("prompt", args.vit, args.frames, 2)
    print(f"training step, {name}, T={args.frames}, batch 2, 101 classes, fp32 CPU:")
    print(f"  bridge (both towers tuned): {b:7.2f} clips/s")
    print(f"  prompt (deep V+L prompts) : {p:7.2f} clips/s   (prompt / bridge = {p / b:.2f}x)")


if __name__ == "__main__":
    main()
