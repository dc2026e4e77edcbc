"""Shared pieces of the benchmarks: a ViT-B/16-shaped CLIP with random weights, the incumbent CoOp
text path (full 77-token prompts through open_clip's own transformer, as KaiyangZhou/CoOp's
TextEncoder does), timing and saved-activation accounting, and the ``--device`` / ``--precision``
options every model benchmark takes (``benchmarks/gpu.sh`` runs them on CUDA)."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP

#: ``--precision`` values: fp32; bf16 autocast (promptlab's ``train.amp=bf16``); the CoOp-family
#: references' pure fp16 (``PREC=fp16``: promptlab's ``model.precision=reference_fp16``).
PRECISIONS = ("fp32", "bf16", "fp16")


def add_runtime_args(ap: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision``, shared by every benchmark that runs a model."""
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32; bf16 (autocast, train.amp=bf16); fp16 (the references' pure fp16, model.precision=reference_fp16)",
    )


@dataclass(frozen=True)
class Runtime:
    """Where a benchmark runs and in which arithmetic; both sides of a comparison use the same one."""

    device: torch.device
    precision: str

    @property
    def model_precision(self) -> str:
        """``load_clip``'s precision: pure fp16 is a property of the weights, bf16 of autocast."""
        return "reference_fp16" if self.precision == "fp16" else "fp32"

    @property
    def tolerance(self) -> float:
        """Relative agreement expected between two formulations of the same step: fp32 sums in another
        order differ by ~1e-6; half-precision formulations that cut prompts differently, by ~1e-2."""
        return 1e-4 if self.precision == "fp32" else 5e-2

    @property
    def grad_atol(self) -> float:
        """Absolute gradient agreement, as a fraction of the largest gradient entry: half-precision
        sums over 12 layers in another order move small entries by a few % of the largest."""
        return 1e-5 if self.precision == "fp32" else 5e-2

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device} ({name}{threads}), {self.precision}"

    @contextlib.contextmanager
    def peak(self, label: str) -> Iterator[None]:
        """Print the CUDA allocator peak of the block above what was allocated before it (no-op on CPU)."""
        if self.device.type != "cuda":
            yield
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        yield
        torch.cuda.synchronize(self.device)
        print(
            f"  CUDA allocator peak, {label}: {(torch.cuda.max_memory_allocated(self.device) - base) / 2**20:.0f} MiB"
        )


def runtime(args: argparse.Namespace) -> Runtime:
    """The :class:`Runtime` of parsed ``--device`` / ``--precision``; exits with a clear message when the
    device does not exist, rather than failing deep inside a benchmark."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cpu" and args.precision == "fp16":
        raise SystemExit(
            "--precision fp16 (pure fp16) is for CUDA; CPU half-precision kernels are not what is measured"
        )
    return Runtime(device, args.precision)


def vit_b16(seed: int = 0, rt: Runtime | None = None) -> FrozenCLIP:
    """ViT-B/16 shapes (text width 512, 12 layers, 77 tokens), random weights: no download."""
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    if rt is None:
        return load_clip(model, None)
    return load_clip(model, None, device=rt.device, precision=rt.model_precision)


def classnames(n: int) -> list[str]:
    return [IMAGENET_CLASSNAMES[i % 1000] for i in range(n)]


def coop_problem(classes: int, n_ctx: int, batch: int, rt: Runtime | None = None):
    """A CoOp module on the ViT-B/16-shaped CLIP plus a batch of image features and labels."""
    from promptlab.methods import CoOp

    clip = vit_b16(rt=rt)
    torch.manual_seed(1)
    module = CoOp(clip, classnames(classes), n_ctx=n_ctx)
    feats, labels = torch.randn(batch, clip.embed_dim), torch.randint(classes, (batch,))
    if rt is not None:
        module.to(rt.device).match_backbone_precision()
        feats, labels = feats.to(rt.device, module.head_dtype), labels.to(rt.device)
    return clip, module, feats, labels


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


def synchronize() -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it (no-op without CUDA in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        t = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int = 3
) -> dict[str, tuple[float, object]]:
    """Median seconds and last output of each function, timed in rounds that run every function once.

    On a shared machine the load drifts over minutes: timing one formulation after the other would
    credit whichever ran in the quieter minute. Interleaving exposes them to the same load, so their
    ratio holds even when their absolute times do not. One untimed warm-up call each first.
    """
    out = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            t = time.perf_counter()
            out[name] = fn()
            synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), out[name]) for name in fns}


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
