"""Shared pieces of the benchmarks: a ViT-B/16-shaped CLIP with random weights, the incumbent CoOp
text path (full 77-token prompts through open_clip's own transformer, as KaiyangZhou/CoOp's
TextEncoder does), timing and saved-activation accounting."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from promptlab.clip import FrozenCLIP, load_clip


def vit_b16(seed: int = 0) -> FrozenCLIP:
    """ViT-B/16 shapes (text width 512, 12 layers, 77 tokens), random weights: no download."""
    torch.manual_seed(seed)
    return load_clip(open_clip.create_model("ViT-B-16", pretrained=None), None)


def classnames(n: int) -> list[str]:
    return [IMAGENET_CLASSNAMES[i % 1000] for i in range(n)]


def coop_problem(classes: int, n_ctx: int, batch: int):
    """A CoOp module on the ViT-B/16-shaped CLIP plus a batch of image features and labels."""
    from promptlab.methods import CoOp

    clip = vit_b16()
    torch.manual_seed(1)
    module = CoOp(clip, classnames(classes), n_ctx=n_ctx)
    return clip, module, torch.randn(batch, clip.embed_dim), torch.randint(classes, (batch,))


def reference_text_features(clip: FrozenCLIP, module) -> torch.Tensor:
    """CoOp's formulation: [SOS][ctx][class . EOT pad] at the full context length, open_clip's transformer."""
    m = clip.model
    names = [c.replace("_", " ") for c in module.classnames]
    ids = clip.tokenize([" ".join(["X"] * module.n_ctx) + " " + n + "." for n in names])  # [C, 77]
    emb = m.token_embedding(ids)
    ctx = module.ctx.unsqueeze(0).expand(len(names), -1, -1) if module.ctx.dim() == 2 else module.ctx
    x = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + module.n_ctx :]], dim=1)
    x = x + m.positional_embedding
    x = m.transformer(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)[torch.arange(x.shape[0]), ids.argmax(-1)]
    return x @ m.text_projection


def coop_loss(
    logit_scale: torch.Tensor, text: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text, dim=-1).t()
    return F.cross_entropy(logits, labels)


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def saved_activation_bytes(
    fn: Callable[[], torch.Tensor], params: list[torch.Tensor], keep: bool
) -> tuple[torch.Tensor, int]:
    """Bytes the autograd graph holds for backward while ``fn`` builds it (weights excluded).

    With ``keep=False`` the saved tensors are dropped as they are packed, so a graph too large
    for this machine (the incumbent at 1000 classes) can still be measured; it cannot then be
    back-propagated. Storages shared by several saved tensors are counted once.
    """
    weights = {p.untyped_storage().data_ptr() for p in params}
    live: dict[int, weakref.ref] = {}  # storage address -> the storage counted there (addresses get reused)
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in weights and (ptr not in live or live[ptr]() is not storage):
            live[ptr] = weakref.ref(storage)
            total += storage.nbytes()
        return t if keep else None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total
