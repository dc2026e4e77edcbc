"""Contrastive pretraining of the sandbox CLIP on (image, caption) pairs from the sandbox world.

Run once by a developer (``python -m promptlab.sandbox.pretrain recipes/sandbox/pretrain.yaml``); the
result ships as ``promptlab/sandbox/sandbox_clip.safetensors``. It is an ordinary open_clip ``CLIP``
with the real BPE tokenizer, trained with CLIP's symmetric InfoNCE loss on batches of freshly
rendered scenes (every step sees new images, so there is no overfitting to a fixed set).

The one shortcut: the world's captions use ~150 of the tokenizer's 49,408 tokens, so training runs
on a compact embedding table (the used rows only), which is also what the file stores (with the
token ids); loading scatters it into a full-size table whose unused rows are zero. Outputs for any
text of the world are unchanged; the CPU is spared a dense 49,408-row update per step, and the fp16
file is a few MB instead of 17.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from promptlab.io import atomic_write_bytes, atomic_write_json, safetensors_bytes
from promptlab.runlog import run_log
from promptlab.sandbox import TOKEN_IDS_KEY, VOCAB_SIZE
from promptlab.sandbox.world import COLOURS, SHAPES, Style, caption, render, sample_scene
from promptlab.transforms import OPENAI_MEAN, OPENAI_STD

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """``recipes/sandbox/pretrain.yaml`` (its ``kind: pretrain`` key marks it as this kind of file)."""

    kind: str = "pretrain"
    seed: int = 0
    image_size: int = 48
    embed_dim: int = 128
    vision: dict[str, int] = field(
        default_factory=lambda: dict(layers=3, width=128, head_width=32, patch_size=8)
    )
    text: dict[str, int] = field(
        default_factory=lambda: dict(layers=2, width=128, heads=4, context_length=32)
    )
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2.0e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    style: dict[str, float] = field(default_factory=lambda: dict(noise=3.0, blur=0.3))
    eval_every: int = 250
    checkpoint_every: int = 50
    threads: int = 2
    workdir: str = "runs/sandbox_pretrain"
    out: str = "promptlab/sandbox/sandbox_clip.safetensors"


def load_pretrain_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    """Read a pretrain recipe; unknown keys are an error (a typo must not silently use a default)."""
    from promptlab.config import check_interpolations

    loaded = OmegaConf.load(path)
    check_interpolations(loaded, str(path))
    raw = OmegaConf.merge(loaded, OmegaConf.from_dotlist(list(overrides)))
    data: dict[str, Any] = OmegaConf.to_container(raw, resolve=True)  # type: ignore[assignment]
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    if data.get("kind", "pretrain") != "pretrain":
        raise ValueError(f"{path}: kind must be 'pretrain', got {data['kind']!r}")
    return PretrainConfig(**data)


def model_config(cfg: PretrainConfig, vocab_size: int = VOCAB_SIZE) -> dict[str, Any]:
    """Keyword arguments of ``open_clip.model.CLIP`` for this recipe."""
    return dict(
        embed_dim=cfg.embed_dim,
        vision_cfg=dict(cfg.vision, image_size=cfg.image_size),
        text_cfg=dict(cfg.text, vocab_size=vocab_size),
    )


def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def world_vocabulary(n_captions: int = 20000, seed: int = 12345) -> list[int]:
    """Sorted token ids the world's texts use: many sampled captions, every class name, common prompts."""
    tok = _tokenizer()
    rng = random.Random(seed)
    texts = [caption(sample_scene(rng), rng) for _ in range(n_captions)]
    texts += [f"a photo of a {c} {s}." for c in COLOURS for s in SHAPES]
    ids = tok(texts, context_length=77)
    return sorted(set(ids.unique().tolist()) | {0, tok.sot_token_id, tok.eot_token_id})


class _Pairs(IterableDataset):
    """Endless (image, token ids) batches; item i of step t is rendered from ``Random(f"{seed}/{t}/{i}")``."""

    def __init__(self, cfg: PretrainConfig, start_step: int, lookup: torch.Tensor) -> None:
        self.cfg, self.start, self.lookup = cfg, start_step, lookup
        self.style = Style(**cfg.style)

    def __iter__(self):
        tok = _tokenizer()
        mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
        std = torch.tensor(OPENAI_STD).view(3, 1, 1)
        for step in range(self.start, self.cfg.steps):
            images, texts = [], []
            for i in range(self.cfg.batch_size):
                rng = random.Random(f"{self.cfg.seed}/{step}/{i}")
                scene = sample_scene(rng)
                img = render(scene, rng, size=self.cfg.image_size, style=self.style)
                images.append(
                    torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(
                        img.height, img.width, 3
                    )
                )
                texts.append(caption(scene, rng))
            x = torch.stack(images).permute(0, 3, 1, 2).float().div(255)  # [B, 3, H, W]
            ids = tok(texts, context_length=self.cfg.text["context_length"])
            yield (x - mean) / std, self.lookup[ids]


def _lr(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings and the temperature (CLIP's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


@torch.no_grad()
def probe_accuracy(
    model: torch.nn.Module,
    lookup: torch.Tensor,
    cfg: PretrainConfig,
    *,
    n: int = 256,
    style: Style | None = None,
) -> float:
    """Zero-shot colour x shape accuracy on ``n`` fixed renders: a progress signal while training."""
    tok = _tokenizer()
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    ids = lookup[tok([f"a photo of a {c}." for c in names], context_length=cfg.text["context_length"])]
    text = F.normalize(model.encode_text(ids), dim=-1)
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    correct = 0
    for start in range(0, n, 128):
        xs, ys = [], []
        for i in range(start, min(n, start + 128)):
            rng = random.Random(f"probe/{i}")
            scene = sample_scene(rng)
            img = render(scene, rng, size=cfg.image_size, style=style or Style(**cfg.style))
            xs.append(
                torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
            )
            ys.append(names.index(f"{scene.colour} {scene.shape}"))
        x = (torch.stack(xs).permute(0, 3, 1, 2).float().div(255) - mean) / std
        pred = (F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(-1)
        correct += int((pred == torch.tensor(ys)).sum())
    return correct / n


def export(
    model: torch.nn.Module, vocab: list[int], cfg: PretrainConfig, out: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """Write fp16 weights with the compact token table and its token ids, plus ``<out>.json``.

    :func:`promptlab.sandbox.load_sandbox_model` scatters the compact table into a full-size one
    (unused rows zero); storing only the used rows keeps the file at a few MB.
    """
    sd = {k: v.detach().half().contiguous() for k, v in sorted(model.state_dict().items())}
    sd[TOKEN_IDS_KEY] = torch.tensor(vocab, dtype=torch.int32)  # row i of the table is token vocab[i]
    blob = safetensors_bytes(sd, {"format": "pt", "producer": "promptlab.sandbox.pretrain"})
    meta = dict(
        model_config=model_config(cfg),
        sha256=hashlib.sha256(blob).hexdigest(),
        n_trained_tokens=len(vocab),
        recipe=asdict(cfg),
        **extra,
    )
    # Atomically, weights first: a crash leaves the old pair or new weights whose sha256 the old
    # metadata rejects on load (never a silently mismatched pair, never a truncated file).
    atomic_write_bytes(out, blob)
    atomic_write_json(out.with_suffix(".json"), meta)
    return meta


def pretrain(cfg: PretrainConfig) -> Path:
    """Train (resuming from ``workdir/last.pt`` when present), then export to ``cfg.out``."""
    import open_clip
    from open_clip.loss import ClipLoss

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    vocab = world_vocabulary()
    lookup = torch.zeros(VOCAB_SIZE, dtype=torch.long)  # unseen ids map to row 0 (the padding token's row)
    lookup[torch.tensor(vocab)] = torch.arange(len(vocab))
    model = open_clip.model.CLIP(**model_config(cfg, vocab_size=len(vocab)))
    opt = _optimizer(model, cfg)
    step, elapsed = 0, 0.0
    ckpt = work / "last.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("resumed from %s at step %d", ckpt, step)
    loss_fn = ClipLoss()
    loader = DataLoader(_Pairs(cfg, step, lookup), batch_size=None, num_workers=1, prefetch_factor=2)
    t0 = time.time() - elapsed
    model.train()
    with run_log(work) as writer:
        step = _train_steps(model, opt, loader, loss_fn, lookup, cfg, step, t0, ckpt, writer)
    model.eval()
    minutes = (time.time() - t0) / 60
    meta = export(model, vocab, cfg, Path(cfg.out), dict(train_minutes=round(minutes, 1), steps=step))
    log.info("exported %s (%.1f min of training, sha256 %s)", cfg.out, minutes, meta["sha256"][:16])
    return Path(cfg.out)


def _train_steps(
    model, opt, loader, loss_fn, lookup, cfg: PretrainConfig, step: int, t0: float, ckpt: Path, writer
) -> int:
    """The contrastive steps from ``step`` to ``cfg.steps``: progress bar, log.txt, TensorBoard, atomic
    checkpoints; a non-finite loss stops before the update, leaving the last checkpoint intact."""
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", unit="step")
    for x, ids in loader:
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        img, txt, scale = model(x, ids)
        loss = loss_fn(img, txt, scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step + 1}; last good checkpoint: {ckpt}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("train/lr", _lr(cfg, step - 1), step)
        if step % 10 == 0 or step == 1:
            log.info(
                "step %d/%d loss %.4f scale %.1f lr %.2e %.1f s",
                step,
                cfg.steps,
                loss.item(),
                scale.item(),
                _lr(cfg, step - 1),
                time.time() - t0,
            )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            acc = probe_accuracy(model, lookup, cfg)
            log.info(
                "step %d probe zero-shot accuracy (%d classes): %.3f", step, len(COLOURS) * len(SHAPES), acc
            )
            writer.add_scalar("probe/zeroshot_accuracy", acc, step)
            model.train()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                dict(
                    model=model.state_dict(), optimizer=opt.state_dict(), step=step, elapsed=time.time() - t0
                ),
                tmp,
            )
            tmp.replace(ckpt)
    bar.close()
    return step


RECORDED_DATASETS = ("sandbox_shapes", "sandbox_clean")


def record(weights: str | Path, data_root: str | Path) -> dict[str, Any]:
    """Measure the exported weights and write the numbers into their JSON (what the tests reproduce).

    Records the backbone fingerprint, the zero-shot accuracy on each sandbox dataset's fixed in-memory
    check set (``datasets.check_set``) and on its generated test split (written under ``data_root``).
    """
    from PIL import Image

    from promptlab.backbones import load_clip
    from promptlab.data import get_spec, load_dataset
    from promptlab.sandbox.datasets import check_set, make_sandbox_dataset, zeroshot_accuracy

    weights, root = Path(weights), Path(data_root).expanduser()
    clip = load_clip("sandbox", str(weights))
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["fingerprint"] = clip.fingerprint()
    meta["zeroshot_check"], meta["zeroshot_test"] = {}, {}
    for name in RECORDED_DATASETS:
        images, labels, names, template = check_set(name)
        acc = zeroshot_accuracy(clip, images, labels, names, template)
        meta["zeroshot_check"][name] = dict(n=len(labels), accuracy=round(acc, 6))
        make_sandbox_dataset(
            root, **{k: v for k, v in get_spec(name).generator.items() if k != "_component_"}
        )
        ds = load_dataset(name, root)
        test_acc = zeroshot_accuracy(
            clip,
            [Image.open(it.path).convert("RGB") for it in ds.test],
            [it.label for it in ds.test],
            ds.classnames,
            ds.template,
        )
        meta["zeroshot_test"][name] = dict(n=len(ds.test), accuracy=round(test_acc, 6))
        log.info("%s zero-shot: check set %.4f, test split %.4f", name, acc, test_acc)
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m promptlab.sandbox.pretrain", description=__doc__.splitlines()[0]
    )
    p.add_argument("recipe", help="recipes/sandbox/pretrain.yaml")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. steps=100 out=/tmp/x.safetensors")
    p.add_argument(
        "--data-root", default="~/.cache/promptlab/data", help="where the recorded test splits are generated"
    )
    p.add_argument("--record-only", action="store_true", help="only (re)measure the exported weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_pretrain_config(args.recipe, args.overrides)
    out = Path(cfg.out) if args.record_only else pretrain(cfg)
    record(out, args.data_root)


if __name__ == "__main__":
    main()
