"""AnomalyCLIP's own loop: train on an auxiliary dataset's masks, evaluate per category, export.

A different loop from the classification engine (pixel masks, two losses, per-category metrics),
so it is its own function, reusing the engine's helpers (seeding, autocast) and atomic writes.
Reference protocol (zqhang/AnomalyCLIP train.py / test.py): Adam(lr 1e-3, betas (0.5, 0.999)),
constant lr, 15 epochs, batch 8, seed 111, 518 px; evaluation one category at a time, metrics
averaged over categories.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from promptlab import io
from promptlab.anomaly.data import LAYOUTS, AnomalyDataset, load_items
from promptlab.anomaly.method import AnomalyCLIP
from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.data.generated import run_generator
from promptlab.engine import autocast, restore_training_state, save_training_state, seed_everything
from promptlab.metrics import AUPRO_CONVENTIONS, aupro, auroc, average_precision
from promptlab.runlog import progress, run_log

log = logging.getLogger(__name__)
CONFIG_FILE, TENSORS_FILE = "prompt_config.json", "prompts.safetensors"


# ---------------------------------------------------------------------- recipe schema (`kind: anomaly`)
@dataclass
class DataSpec:
    layout: str = "mvtec"
    root: str = "data/mvtec"
    split: str = "test"
    categories: list[str] | None = None
    # Procedural data only (the sandbox): {_component_: dotted.path, **kwargs}, called as
    # fn(root, **kwargs) to write the dataset at `root` on first use; it skips work when complete.
    generator: dict[str, Any] | None = None


@dataclass
class ModelSpec:
    arch: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    precision: str = "fp32"


@dataclass
class TrainSpec:
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    amp: str = "fp32"
    num_workers: int = 0


@dataclass
class EvalSpec:
    batch_size: int = 8
    sigma: float = 4.0
    aupro: str = "published"


@dataclass
class AnomalyRecipe:
    kind: str = "anomaly"
    seed: int = 111
    data_root: str = "data"
    output_dir: str = "runs/anomaly"
    device: str = "auto"
    image_size: int = 518
    model: ModelSpec = field(default_factory=ModelSpec)
    method: dict[str, Any] = field(default_factory=dict)
    train_data: DataSpec | None = None
    eval_data: DataSpec | None = None
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


def load_anomaly_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load and validate a ``kind: anomaly`` recipe (types, unknown keys, method keywords, enums)."""
    schema = OmegaConf.structured(AnomalyRecipe)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:  # wrong type, unknown key: say which file and key
        raise ValueError(f"{path}: {e}") from e
    if cfg.kind != "anomaly":
        raise ValueError(f"{path}: kind must be 'anomaly', got {cfg.kind!r}")
    allowed = set(inspect.signature(AnomalyCLIP.__init__).parameters) - {"self", "clip", "classnames"}
    unknown = sorted(set(cfg.method) - allowed)
    if unknown:
        raise ValueError(f"{path}: method keys {unknown} are not AnomalyCLIP arguments ({sorted(allowed)})")
    for spec in (cfg.train_data, cfg.eval_data):
        if spec is not None and spec.layout not in LAYOUTS:
            raise ValueError(f"{path}: layout {spec.layout!r}: expected one of {LAYOUTS}")
    if cfg.eval.aupro not in AUPRO_CONVENTIONS:
        raise ValueError(f"{path}: eval.aupro={cfg.eval.aupro!r}: expected one of {AUPRO_CONVENTIONS}")
    OmegaConf.resolve(cfg)
    return cfg


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ---------------------------------------------------------------------- train
def train_anomaly(
    module: AnomalyCLIP,
    dataset: AnomalyDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    betas: tuple[float, float] = (0.5, 0.999),
    run_dir: Path,
    device: torch.device,
    amp: str = "fp32",
    seed: int = 111,
    num_workers: int = 0,
    resume: bool = False,
    writer: Any = None,
) -> dict[str, float]:
    """Train the prompts on images with masks; the last epoch's prompts are kept.

    Only the prompt tokens are optimised (the reference also hands Adam unused projection layers,
    which never receive gradients and so change nothing). A checkpoint is written atomically after
    every epoch; ``resume`` continues from it. ``writer`` (a TensorBoard ``SummaryWriter``) gets the
    per-epoch losses.
    """
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers
    )
    opt = torch.optim.Adam(module.trainable_parameters(), lr=lr, betas=tuple(betas))
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    start = 0
    if resume and ckpt_path.exists():
        start = restore_training_state(ckpt_path, module, opt, generator)  # also restores the global RNGs
    module.to(device).train()
    stats = {"map_loss": float("nan"), "image_loss": float("nan")}
    for epoch in range(start, epochs):
        map_sum = img_sum = 0.0
        for images, masks, labels, _ in progress(loader, f"epoch {epoch + 1}", leave=False):
            images, masks, labels = images.to(device), masks.to(device), labels.to(device)
            with autocast(device, amp):
                out = module.outputs(images)
                image_loss = module.loss(out.image_logits, labels)
                total = module.loss(out.image_logits, labels, layer_maps=out.layer_maps, masks=masks)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch + 1}; last good checkpoint: {ckpt_path}"
                )
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            map_sum += float(total.detach() - image_loss.detach())
            img_sum += float(image_loss.detach())
        stats = {"map_loss": map_sum / len(loader), "image_loss": img_sum / len(loader)}
        log.info(
            "epoch %d/%d  map loss %.4f  image loss %.4f",
            epoch + 1,
            epochs,
            stats["map_loss"],
            stats["image_loss"],
        )
        if writer is not None:
            for key, value in stats.items():
                writer.add_scalar(f"train/{key}", value, epoch + 1)
        save_training_state(ckpt_path, module, opt, epoch + 1, generator)
    module.eval()
    return stats


# ---------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate_anomaly(
    module: AnomalyCLIP,
    dataset: AnomalyDataset,
    *,
    device: torch.device,
    batch_size: int = 8,
    sigma: float = 4.0,
    aupro_convention: str = "published",
    amp: str = "fp32",
) -> dict[str, Any]:
    """Per-category image AUROC / AP, pixel AUROC / AUPRO (in %) and their mean over categories.

    Pixel metrics are skipped (None) for a category whose anomalous images have no masks.
    """
    module.to(device).eval()
    scores, maps, gts = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with module.cached_text_features(), autocast(device, amp):
        for images, masks, _, _ in progress(loader, "evaluate", leave=False):
            s, a = module.scores(module.outputs(images.to(device)), sigma)
            scores.append(s.float().cpu())
            maps.append(a.float().cpu())
            gts.append(masks[:, 0] > 0.5)
    scores, maps, gts = torch.cat(scores), torch.cat(maps), torch.cat(gts)  # [N], [N, H, W], [N, H, W]
    items = dataset.items
    labels = torch.tensor([it.label for it in items])
    per_cat: dict[str, dict[str, float | None]] = {}
    for cat in sorted({it.category for it in items}):
        idx = torch.tensor([i for i, it in enumerate(items) if it.category == cat])
        row: dict[str, float | None] = {
            "image_auroc": 100 * auroc(scores[idx], labels[idx]),
            "image_ap": 100 * average_precision(scores[idx], labels[idx]),
        }
        has_masks = all(items[i].mask is not None for i in idx.tolist() if items[i].label == 1)
        if has_masks:
            row["pixel_auroc"] = 100 * auroc(maps[idx], gts[idx])
            row["pixel_aupro"] = 100 * aupro(maps[idx], gts[idx], convention=aupro_convention)
        else:
            row["pixel_auroc"] = row["pixel_aupro"] = None
        per_cat[cat] = row
    mean = {}
    for k in ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"):
        vals = [r[k] for r in per_cat.values() if r[k] is not None]
        mean[k] = sum(vals) / len(vals) if vals else None
    return {"mean": mean, "categories": per_cat, "n": len(items), "aupro_convention": aupro_convention}


# ---------------------------------------------------------------------- export
def save_anomaly_prompts(module: AnomalyCLIP, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Learned tensors (``prompts.safetensors``) and a ``prompt_config.json`` written last, atomically."""
    out_dir = Path(out_dir)
    state = {k: v.float() for k, v in module.prompt_state_dict().items()}
    blob = io.safetensors_bytes(state, {"format": "pt", "method": "anomalyclip"})
    clip = module.clip
    cfg = {
        "kind": "anomaly",
        "method": "anomalyclip",
        "hparams": dict(module.hparams),
        "arch": clip.arch,
        "pretrained": clip.pretrained,
        "fingerprint": clip.fingerprint(),
        "files": {TENSORS_FILE: {"sha256": hashlib.sha256(blob).hexdigest()}},
        **(extra or {}),
    }
    io.atomic_write_bytes(out_dir / TENSORS_FILE, blob)
    io.atomic_write_json(out_dir / CONFIG_FILE, cfg)
    return out_dir


def load_anomaly_prompts(
    prompts_dir: str | Path, clip: FrozenCLIP | None = None, device: str | torch.device = "cpu"
) -> AnomalyCLIP:
    """Rebuild an exported AnomalyCLIP on ``clip`` (default: the backbone recorded in the export)."""
    d = Path(prompts_dir)
    d = d / "prompts" if not (d / CONFIG_FILE).exists() and (d / "prompts" / CONFIG_FILE).exists() else d
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d / CONFIG_FILE}: not an AnomalyCLIP prompts directory")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    if cfg.get("method") != "anomalyclip":
        raise ValueError(f"{d / CONFIG_FILE}: method {cfg.get('method')!r} is not anomalyclip")
    blob = (d / TENSORS_FILE).read_bytes()
    if hashlib.sha256(blob).hexdigest() != cfg["files"][TENSORS_FILE]["sha256"]:
        raise ValueError(f"{d / TENSORS_FILE} does not match {d / CONFIG_FILE} (checksum): export again")
    clip = clip if clip is not None else load_clip(cfg["arch"], cfg.get("pretrained"), device=device)
    if clip.fingerprint() != cfg["fingerprint"]:
        log.warning("%s: prompts were learned on other backbone weights (fingerprint differs)", d)
    from safetensors.torch import load as load_safetensors

    with torch.random.fork_rng(devices=[]):
        module = AnomalyCLIP(clip, **cfg["hparams"])
    module.load_prompt_state_dict(load_safetensors(blob), source=str(d / TENSORS_FILE))
    return module.to(clip.device)


# ---------------------------------------------------------------------- one run
def _dataset(spec: Any, size: int, clip: FrozenCLIP) -> AnomalyDataset:
    root = Path(spec.root).expanduser()
    if spec.generator:  # generated on first use, like runner.ensure_data for classification
        run_generator(
            OmegaConf.to_container(spec.generator), root, source=f"recipe data {spec.root}: generator"
        )
    items = load_items(spec.layout, root, spec.split, list(spec.categories) if spec.categories else None)
    return AnomalyDataset(items, size, clip.image_mean, clip.image_std)


def run_anomaly(cfg: Any, *, resume: bool = False) -> dict[str, Any]:
    """Recipe -> train on ``train_data`` (if epochs > 0) -> export -> evaluate on ``eval_data``."""
    out = Path(cfg.output_dir)
    with run_log(out) as writer:
        return _run_anomaly(cfg, out, writer, resume)


def _run_anomaly(cfg: Any, out: Path, writer: Any, resume: bool) -> dict[str, Any]:
    seed_everything(cfg.seed)
    device = _device(cfg.device)
    clip = load_clip(cfg.model.arch, cfg.model.pretrained, device=device, precision=cfg.model.precision)
    module = AnomalyCLIP(clip, **OmegaConf.to_container(cfg.method)).to(device)
    io.atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    result: dict[str, Any] = {}
    if cfg.train.epochs > 0 and cfg.train_data is not None:
        t = cfg.train
        result["train"] = train_anomaly(
            module,
            _dataset(cfg.train_data, cfg.image_size, clip),
            epochs=t.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            betas=tuple(t.betas),
            run_dir=out,
            device=device,
            amp=t.amp,
            seed=cfg.seed,
            num_workers=t.num_workers,
            resume=resume,
            writer=writer,
        )
    save_anomaly_prompts(module, out / "prompts", {"image_size": cfg.image_size, "sigma": cfg.eval.sigma})
    if cfg.eval_data is not None:
        result.update(
            evaluate_anomaly(
                module,
                _dataset(cfg.eval_data, cfg.image_size, clip),
                device=device,
                batch_size=cfg.eval.batch_size,
                sigma=cfg.eval.sigma,
                aupro_convention=cfg.eval.aupro,
                amp=cfg.train.amp,
            )
        )
    result["prompts"] = str(out / "prompts")
    for key, value in (result.get("mean") or {}).items():
        if value is not None:
            writer.add_scalar(f"eval/{key}", value)
    io.atomic_write_json(out / "metrics.json", result)
    return result
