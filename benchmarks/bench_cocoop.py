"""Batched CoCoOp training step against the reference per-image loop, on ViT-B/16 text-tower shapes.

Three ways to compute the same step (logits, cross-entropy, backward into ctx and the meta-net):
  reference  the KaiyangZhou/CoOp ``trainers/cocoop.py`` formulation: a Python loop over the images,
             each running C prompts of 77 tokens through open_clip's text transformer;
  loop       promptlab's CoCoOp called once per image (prompts cut to the longest, one image at a time);
  batched    promptlab's CoCoOp on the whole batch: B x C prompts in one text-tower call.
Weights are random (open_clip ViT-B-16 text tower: width 512, 12 layers, 8 heads; a tiny image tower,
since the step starts from image features). Logits and gradients of the three are checked to agree.

    python benchmarks/bench_cocoop.py [--classes 20] [--batch 4] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cocoop_parity import ref_cocoop_logits  # noqa: E402  (the reference formulation, written once)

from promptlab.clip import load_clip  # noqa: E402
from promptlab.methods import CoCoOp  # noqa: E402

PET_NAMES = [
    "Abyssinian",
    "american_bulldog",
    "american_pit_bull_terrier",
    "basset_hound",
    "beagle",
    "Bengal",
    "Birman",
    "Bombay",
    "boxer",
    "British_Shorthair",
    "chihuahua",
    "Egyptian_Mau",
    "english_cocker_spaniel",
    "english_setter",
    "german_shorthaired",
    "great_pyrenees",
    "havanese",
    "japanese_chin",
    "keeshond",
    "leonberger",
    "Maine_Coon",
    "miniature_pinscher",
    "newfoundland",
    "Persian",
    "pomeranian",
    "pug",
    "Ragdoll",
    "Russian_Blue",
    "saint_bernard",
    "samoyed",
    "scottish_terrier",
    "shiba_inu",
    "Siamese",
    "Sphynx",
    "staffordshire_bull_terrier",
    "wheaten_terrier",
    "yorkshire_terrier",
]


def timed(fn, repeats: int) -> tuple[float, tuple]:
    out = fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / repeats, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = open_clip.model.CLIP(
        embed_dim=512,
        vision_cfg=dict(layers=1, width=64, head_width=32, patch_size=16, image_size=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
        quick_gelu=True,
    )
    clip = load_clip(model)
    names = (PET_NAMES * (args.classes // len(PET_NAMES) + 1))[: args.classes]
    m = CoCoOp(clip, names, ctx_init="a photo of a")
    feats = torch.randn(args.batch, clip.embed_dim)
    labels = torch.arange(args.batch) % args.classes
    params = [m.ctx, *m.meta_net.parameters()]

    def batched():
        logits = m(image_features=feats)
        return (logits.detach(), *torch.autograd.grad(F.cross_entropy(logits, labels), params))

    def loop():
        logits = torch.cat([m(image_features=f[None]) for f in feats])
        return (logits.detach(), *torch.autograd.grad(F.cross_entropy(logits, labels), params))

    def reference():
        logits = ref_cocoop_logits(clip.model, names, "a photo of a", m.ctx, m.meta_net, feats)
        return (logits.detach(), *torch.autograd.grad(F.cross_entropy(logits, labels), params))

    print(
        f"CoCoOp step, ViT-B/16 text tower (random weights), B={args.batch} images x C={args.classes} classes, "
        f"{args.threads} threads, mean of {args.repeats} after a warm-up; longest prompt "
        f"{int(m._eot.max()) + 1} of 77 tokens"
    )
    t_ref, out_ref = timed(reference, args.repeats)
    t_loop, out_loop = timed(loop, args.repeats)
    t_bat, out_bat = timed(batched, args.repeats)
    for what, out in (("loop", out_loop), ("batched", out_bat)):
        err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(out, out_ref))
        assert err < 1e-4, f"{what} disagrees with the reference: max relative error {err:.2e}"
        print(f"  {what:9s} agrees with the reference: max relative error over logits and grads {err:.1e}")
    print(f"  reference (per-image loop, 77 tokens): {t_ref * 1e3:9.1f} ms")
    print(
        f"  loop      (per image, truncated):      {t_loop * 1e3:9.1f} ms   {t_ref / t_loop:5.2f}x faster than reference"
    )
    print(
        f"  batched   (one call, truncated):       {t_bat * 1e3:9.1f} ms   {t_ref / t_bat:5.2f}x faster than reference, "
        f"{t_loop / t_bat:5.2f}x faster than the truncated loop"
    )


if __name__ == "__main__":
    main()
