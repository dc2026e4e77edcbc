"""Benchmark 1: one CoOp text-side training step, promptlab vs the incumbent formulation.

ViT-B/16 text-tower shapes (random weights), 100 classes, 16 context tokens, class token at the end.
Step = context -> prompts -> text tower -> loss -> backward. The incumbent runs every prompt at 77
tokens; promptlab cuts the batch to its longest prompt and runs the shared [SOS]+context prefix once.
Checks that the loss and the gradient w.r.t. the context agree, then prints the speed ratio.

    python benchmarks/bench_coop_text.py [--classes 100] [--n-ctx 16] [--repeats 3] [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse

import torch
from common import add_runtime_args, coop_loss, coop_problem, median_time, reference_text_features, runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rt = runtime(args)
    clip, module, feats, labels = coop_problem(args.classes, args.n_ctx, args.batch, rt)
    scale = clip.logit_scale

    def step(text_fn):
        module.ctx.grad = None
        with rt.autocast():
            loss = coop_loss(scale, text_fn(), feats, labels)
        loss.backward()
        return loss.detach().float(), module.ctx.grad.float().clone()

    ref_loss, ref_grad = step(lambda: reference_text_features(clip, module))
    our_loss, our_grad = step(module.text_features)
    tol = rt.tolerance
    torch.testing.assert_close(our_loss, ref_loss, atol=tol / 10, rtol=tol / 10)
    torch.testing.assert_close(our_grad, ref_grad, atol=rt.grad_atol * ref_grad.abs().max().item(), rtol=tol)
    print(f"CoOp text step, {args.classes} classes, n_ctx {args.n_ctx}, ViT-B/16 text tower, {rt.describe()}")
    with rt.peak("incumbent step"):
        t_ref = median_time(lambda: step(lambda: reference_text_features(clip, module)), args.repeats)
    with rt.peak("promptlab step"):
        t_ours = median_time(lambda: step(module.text_features), args.repeats)
    L = int(module._eot.max()) + 1
    print(
        f"  loss ref {ref_loss.item():.6f} ours {our_loss.item():.6f}; max |grad diff| {(our_grad - ref_grad).abs().max().item():.2e}"
    )
    print(f"  incumbent (77 tokens):                     {t_ref * 1000:8.1f} ms/step")
    print(f"  promptlab (cut to {L} tokens, shared prefix): {t_ours * 1000:8.1f} ms/step")
    print(f"  speed-up: {t_ref / t_ours:.1f}x")


if __name__ == "__main__":
    main()
