"""Batched CoCoOp training step against the reference per-image loop, on ViT-B/16 text-tower shapes.

Three ways to compute the same step (logits, cross-entropy, backward into ctx and the meta-net):
  reference  the KaiyangZhou/CoOp ``trainers/cocoop.py`` formulation: a Python loop over the images,
             each running C prompts of 77 tokens through open_clip's text transformer;
  loop       promptlab's CoCoOp called once per image (prompts cut to the longest, one image at a time);
  batched    promptlab's CoCoOp on the whole batch: B x C prompts in one text-tower call.
Weights are random (open_clip ViT-B-16 text tower: width 512, 12 layers, 8 heads; a tiny image tower,
since the step starts from image features). Logits and gradients of the three are checked to agree.

    python benchmarks/bench_cocoop.py [--classes 20] [--batch 4] [--repeats 3] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import add_runtime_args, interleaved_times, runtime  # noqa: E402
from test_cocoop_parity import RefCoCoOp  # noqa: E402  (the reference formulation, written once)

from promptlab.backbones import load_clip  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runtime_args(ap)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rt = runtime(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = open_clip.model.CLIP(
        embed_dim=512,
        vision_cfg=dict(layers=1, width=64, head_width=32, patch_size=16, image_size=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
        quick_gelu=True,
    )
    names = (PET_NAMES * (args.classes // len(PET_NAMES) + 1))[: args.classes]
    ref = RefCoCoOp(
        model, names, n_ctx=4, ctx_init="a photo of a"
    )  # built on the CPU fp32 model, as the reference
    clip = load_clip(
        model, device=rt.device, precision=rt.model_precision
    )  # moves and casts `model` in place
    m = CoCoOp(clip, names, ctx_init="a photo of a").to(rt.device)
    m.match_backbone_precision()
    ref.meta_net = m.meta_net  # the same learned tensors on both sides: only the formulation differs
    ref.ctx = m.ctx
    ref.tokenized_prompts = ref.tokenized_prompts.to(rt.device)
    ref.token_prefix = ref.token_prefix.to(rt.device, clip.prompt_dtype)
    ref.token_suffix = ref.token_suffix.to(rt.device, clip.prompt_dtype)
    feats = torch.randn(args.batch, clip.embed_dim, device=rt.device, dtype=m.head_dtype)
    labels = torch.arange(args.batch, device=rt.device) % args.classes
    params = [m.ctx, *m.meta_net.parameters()]

    def grads(logits):
        with rt.autocast():
            loss = F.cross_entropy(logits, labels)
        return (logits.detach().float(), *(g.float() for g in torch.autograd.grad(loss, params)))

    def batched():
        with rt.autocast():
            logits = m(image_features=feats)
        return grads(logits)

    def loop():
        with rt.autocast():
            logits = torch.cat([m(image_features=f[None]) for f in feats])
        return grads(logits)

    def reference():
        with rt.autocast():
            logits = ref.forward_features(feats)
        return grads(logits)

    print(
        f"CoCoOp step, ViT-B/16 text tower (random weights), B={args.batch} images x C={args.classes} classes, "
        f"{rt.describe()}, median of {args.repeats} interleaved rounds after a warm-up; longest prompt "
        f"{int(m._eot.max()) + 1} of 77 tokens"
    )
    if rt.device.type == "cuda":  # allocator peaks need each formulation alone
        for label, fn in (
            ("reference step", reference),
            ("per-image truncated step", loop),
            ("batched step", batched),
        ):
            with rt.peak(label):
                fn()
    res = interleaved_times({"reference": reference, "loop": loop, "batched": batched}, args.repeats)
    (t_ref, out_ref), (t_loop, out_loop), (t_bat, out_bat) = res["reference"], res["loop"], res["batched"]
    for what, out in (("loop", out_loop), ("batched", out_bat)):
        err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(out, out_ref))
        assert err < rt.tolerance, f"{what} disagrees with the reference: max relative error {err:.2e}"
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
