"""Benchmark 4: memory of a 1000-class (ImageNet-size) CoOp step, with and without promptlab's text-side savings.

Measures the activation bytes the autograd graph holds for backward (the part of peak memory that
grows with the class count; weights excluded), plus CUDA peak memory when a GPU is present:
- incumbent: full 77-token prompts (measured with saved tensors dropped on the fly: at 1000 classes
  it does not fit in this machine's memory, which is the problem being solved);
- promptlab: prompts cut to the longest one, shared [SOS]+context prefix, activation checkpointing.
Checks that both compute the same loss, then prints the ratio.

    python benchmarks/bench_memory.py [--classes 1000] [--n-ctx 16]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    Runtime,
    add_runtime_args,
    coop_loss,
    coop_problem,
    reference_text_features,
    runtime,
    saved_activation_bytes,
)

from promptlab.methods import CoOp


def main() -> None:
    ap = argparse.ArgumentParser()
    add_runtime_args(ap)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--n-ctx", type=int, default=16)
    args = ap.parse_args()
    rt = runtime(args)
    clip, module, feats, labels = coop_problem(args.classes, args.n_ctx, 32, rt)
    params = list(clip.parameters())

    def loss_of(text_fn):
        def loss():
            with rt.autocast():
                return coop_loss(clip.logit_scale, text_fn(), feats, labels)

        return loss

    ref_loss, ref_bytes = saved_activation_bytes(
        loss_of(lambda: reference_text_features(clip, module)), params, keep=False
    )
    variants = {}
    for name, ckpt in (("truncation + shared prefix", False), ("+ activation checkpointing", True)):
        clip.grad_checkpointing = ckpt
        loss, nbytes = saved_activation_bytes(loss_of(module.text_features), params, keep=True)
        loss.backward()  # the promptlab graph fits: prove it back-propagates
        tol = rt.tolerance / 10
        torch.testing.assert_close(loss.detach().float(), ref_loss.detach().float(), atol=tol, rtol=tol)
        variants[name] = (loss.item(), nbytes)
    clip.grad_checkpointing = False
    gib = 2**30
    print(
        f"CoOp step, {args.classes} classes, n_ctx {args.n_ctx}, ViT-B/16 text tower, {rt.describe()}: "
        "activation memory held for backward"
    )
    print(f"  incumbent (77 tokens):        {ref_bytes / gib:7.2f} GiB  loss {ref_loss.item():.6f}")
    for name, (loss, nbytes) in variants.items():
        print(
            f"  promptlab {name:28s} {nbytes / gib:7.3f} GiB  loss {loss:.6f}  ratio {ref_bytes / nbytes:6.1f}x lower"
        )
    if rt.device.type == "cuda":
        cuda_peaks(module, feats, labels, rt)


def cuda_peaks(module: CoOp, feats: torch.Tensor, labels: torch.Tensor, rt: Runtime) -> None:
    """Allocator peak of one full step on the GPU (incumbent, then promptlab with checkpointing)."""
    module.cuda()
    clip = module.clip
    feats, labels = feats.cuda(), labels.cuda()
    peaks = {}
    for name, fn, ckpt in (
        ("incumbent", lambda: reference_text_features(clip, module), False),
        ("promptlab", module.text_features, True),
    ):
        clip.grad_checkpointing = ckpt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            with rt.autocast():
                loss = coop_loss(clip.logit_scale, fn(), feats, labels)
            loss.backward()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        except torch.OutOfMemoryError:
            peaks[name] = float("inf")
        module.ctx.grad = None
    clip.grad_checkpointing = False
    print(
        f"  CUDA peak above weights: incumbent {peaks['incumbent']:.2f} GiB, promptlab {peaks['promptlab']:.3f} GiB, "
        f"ratio {peaks['incumbent'] / peaks['promptlab']:.1f}x"
    )


if __name__ == "__main__":
    main()
