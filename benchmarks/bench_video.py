"""Clips per second of the video reader (keyframe seeking vs sequential decoding), of the video loader
(PyAV files vs frame folders) and of a ViFi-CLIP training step.

Writes a few real videos (MPEG-4, 320x240, 10 s at 25 fps, like a UCF101 clip) and the same frames as
JPEG folders into a temporary folder. It times ``read_frames`` alone on T segment-sampled frames per clip
(training offsets), seeking and sequential alternately in the same run, for a GOP-12 MPEG-4 clip
(FFmpeg's default GOP), a one-keyframe MPEG-4 clip and an H.264 clip with B-frames and a 250-frame
GOP (libx264's default keyint, as in many web videos); then one pass of ``VideoBatches`` over the files
both ways and over the folders (T frames per clip, the training augmentation at 224 px); then bridge /
prompt training steps of a CLIP.

    python benchmarks/bench_video.py                   # tiny CLIP steps, 8 frames
    python benchmarks/bench_video.py --vit --frames 8  # ViT-B/16-shaped CLIP (random weights): slow on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

import av
import numpy as np
import torch
from PIL import Image

from promptlab.backbones import load_clip
from promptlab.data import Item
from promptlab.methods import ViFiCLIP
from promptlab.video import data as video_data
from promptlab.video.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipTransform,
    VideoBatches,
    VideoDataset,
    read_frames,
    sample_frame_indices,
)

READER_CASES = {  # name -> (file suffix, codec, GOP, B-frames)
    "MPEG-4, GOP 12": (".avi", "mpeg4", 12, 0),
    "MPEG-4, one keyframe": (".avi", "mpeg4", 250, 0),
    "H.264, B-frames, GOP 250": (".mp4", "libx264", 250, 3),
}


def write_clip(
    path: Path,
    frames_dir: Path | None,
    n: int,
    seed: int,
    codec: str = "mpeg4",
    gop: int = 12,
    bframes: int = 0,
) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    if frames_dir is not None:
        frames_dir.mkdir(parents=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        s.gop_size = gop
        s.codec_context.max_b_frames = bframes
        s.options = {"sc_threshold": "1000000000"} if codec == "mpeg4" else {}  # keyframes every `gop` frames
        for i in range(n):
            img = np.roll(base, 3 * i, axis=1)  # moving texture
            if frames_dir is not None:
                Image.fromarray(img).save(frames_dir / f"img_{i + 1:05d}.jpg", quality=90)
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode())


def reader_rates(paths: list[str], n: int, frames: int, rounds: int) -> tuple[float, float]:
    """Clips/s of ``read_frames`` with and without seeking: the median of ``rounds`` alternating passes
    (alternating, so a load change on a shared CPU hits both sides alike)."""
    g = torch.Generator().manual_seed(0)
    clips = [(p, sample_frame_indices(n, frames, train=True, generator=g)) for p in paths * 2]
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for seek in (True, False):
            start = time.perf_counter()
            for p, idx in clips:
                read_frames(p, idx, seek=seek)
            times[seek].append(time.perf_counter() - start)
    return len(clips) / statistics.median(times[True]), len(clips) / statistics.median(times[False])


def loader_rate(items: list[Item], frames: int, size: int, workers: int) -> float:
    t = ClipTransform(size, IMAGENET_MEAN, IMAGENET_STD, train=True)
    batches = VideoBatches(
        VideoDataset(items, frames, t), 2, torch.Generator().manual_seed(0), num_workers=workers
    )
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
    ap.add_argument("--rounds", type=int, default=5, help="alternating passes of the reader timing")
    ap.add_argument("--loader-rounds", type=int, default=3, help="alternating passes of the loader timing")
    ap.add_argument("--vit", action="store_true", help="time steps on a ViT-B/16-shaped CLIP")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files, folders = [], []
        for i in range(args.videos):
            write_clip(Path(tmp) / f"v{i}.avi", Path(tmp) / f"v{i}", 250, i)
            files.append(Item(str(Path(tmp) / f"v{i}.avi"), i % 2, "x"))
            folders.append(Item(str(Path(tmp) / f"v{i}"), i % 2, "x"))
        print(
            f"read_frames, T={args.frames} training offsets, 250-frame 320x240 videos, median of {args.rounds} passes:"
        )
        for name, (suffix, codec, gop, bframes) in READER_CASES.items():
            if codec not in av.codecs_available:
                print(f"  {name:26s}: no {codec} encoder in this PyAV build")
                continue
            paths = []
            for i in range(args.videos):
                paths.append(str(Path(tmp) / f"r{gop}_{codec}_{i}{suffix}"))
                write_clip(Path(paths[-1]), None, 250, i, codec, gop, bframes)
            seek, seq = reader_rates(paths, 250, args.frames, args.rounds)
            print(
                f"  {name:26s}: seeking {seek:7.2f} clips/s, sequential {seq:7.2f} clips/s   (seeking / sequential = {seek / seq:.2f}x)"
            )
        f_rates, s_rates = [], []
        for _ in range(args.loader_rounds):  # alternating, as above: augmentation dominates and is noisy
            f_rates.append(loader_rate(files, args.frames, 224, args.workers))
            with mock.patch.object(video_data, "read_frames", partial(read_frames, seek=False)):
                s_rates.append(loader_rate(files, args.frames, 224, args.workers))
        f_rate, s_rate = statistics.median(f_rates), statistics.median(s_rates)
        d_rate = loader_rate(folders, args.frames, 224, args.workers)
    print(
        f"loader, T={args.frames}, 224 px train augmentation, {args.workers} workers, 250-frame 320x240 GOP-12 videos"
        f" (median of {args.loader_rounds} passes):"
    )
    print(f"  PyAV video files, sequential: {s_rate:7.2f} clips/s")
    print(
        f"  PyAV video files, seeking   : {f_rate:7.2f} clips/s   (seeking / sequential = {f_rate / s_rate:.2f}x)"
    )
    print(
        f"  JPEG frame folder           : {d_rate:7.2f} clips/s   (folder / seeking file = {d_rate / f_rate:.2f}x)"
    )
    name = "ViT-B/16-shaped CLIP" if args.vit else "tiny CLIP"
    b = step_rate("bridge", args.vit, args.frames, 2)
    p = step_rate("prompt", args.vit, args.frames, 2)
    print(f"training step, {name}, T={args.frames}, batch 2, 101 classes, fp32 CPU:")
    print(f"  bridge (both towers tuned): {b:7.2f} clips/s")
    print(f"  prompt (deep V+L prompts) : {p:7.2f} clips/s   (prompt / bridge = {p / b:.2f}x)")


if __name__ == "__main__":
    main()
