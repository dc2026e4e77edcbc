"""``task: anomaly``: AnomalyCLIP's zero-shot protocol as a task of the one runner and engine.

The prompts train on an auxiliary dataset's images *and pixel masks* (``anomaly.train_data``; its
test split, the one with masks) and are evaluated, one category at a time, on another dataset whose
objects were never seen (``anomaly.eval_data``). A batch holds ``images`` [B, 3, S, S] and ``masks``
[B, 1, S, S] with the image labels (1 = anomalous); the loss is the module's
(``AnomalyCLIP.training_step``: image cross-entropy + focal / dice map losses); the evaluator is
:class:`promptlab.anomaly.evaluator.AnomalyEvaluator`. Reference protocol (zqhang/AnomalyCLIP
train.py): shuffled batches of 8, the last short batch kept, Adam(1e-3, (0.5, 0.999)) at a constant
lr, 15 epochs, seed 111.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from promptlab import distributed
from promptlab.anomaly.data import AnomalyDataset, AnomalyItem, load_items
from promptlab.anomaly.evaluator import METRICS, AnomalyEvaluator
from promptlab.data.generated import run_generator
from promptlab.engine import Batch, ImageBatches
from promptlab.prompts import PromptModule


@dataclass
class AnomalyData:
    """The two datasets of a run. ``classnames`` are the two object-agnostic states."""

    name: str  # the evaluation dataset's folder name
    train: list[AnomalyItem]
    eval: list[AnomalyItem]
    classnames: tuple[str, ...] = ("normal", "anomalous")  # AnomalyCLIP is object-agnostic


class AnomalyBatches(ImageBatches):
    """``({"images", "masks"}, labels)`` batches of an :class:`AnomalyDataset`, shuffled by ``generator``
    when training; the last short batch is kept (the reference's DataLoader)."""

    def __init__(
        self,
        dataset: AnomalyDataset,
        batch_size: int,
        generator: torch.Generator,
        *,
        shuffle: bool,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        super().__init__(dataset, batch_size, generator, shuffle, num_workers, shard, drop_last=False)

    def __iter__(self) -> Iterator[Batch]:
        for images, masks, labels, _ in self.loader:
            yield {"images": images, "masks": masks}, labels


def _generate(spec: Any) -> None:
    if spec.generator:  # procedural data (the sandbox), written on first use
        run_generator(
            OmegaConf.to_container(spec.generator),
            Path(spec.root).expanduser(),
            source=f"anomaly data {spec.root}: generator",
        )


def _items(spec: Any) -> list[AnomalyItem]:
    cats = list(spec.categories) if spec.categories else None
    return load_items(spec.layout, Path(spec.root).expanduser(), spec.split, cats)


class AnomalyDetection:
    """The :class:`promptlab.tasks.Task` of ``task: anomaly`` (the recipe's ``anomaly`` section)."""

    def ensure_data(self, cfg: DictConfig) -> None:
        _generate(cfg.anomaly.train_data)
        _generate(cfg.anomaly.eval_data)

    def prepare(self, cfg: DictConfig) -> AnomalyData:
        a = cfg.anomaly
        self.ensure_data(cfg)
        return AnomalyData(Path(a.eval_data.root).name, _items(a.train_data), _items(a.eval_data))

    def batches(
        self,
        cfg: DictConfig,
        data: AnomalyData,
        module: PromptModule,
        *,
        train: bool,
        generator: torch.Generator,
        device: torch.device,
    ) -> AnomalyBatches:
        clip = module.clip
        items = data.train if train else data.eval
        dataset = AnomalyDataset(items, int(cfg.anomaly.image_size), clip.image_mean, clip.image_std)
        return AnomalyBatches(
            dataset,
            cfg.train.batch_size if train else cfg.eval.batch_size,
            generator,
            shuffle=train,
            num_workers=int(cfg.anomaly.num_workers),
            # training batches are sharded under DDP; every process evaluates the whole set
            shard=distributed.current_shard() if train else (0, 1),
        )

    def fit_data(
        self, cfg: DictConfig, data: AnomalyData, module: PromptModule, *, device: torch.device
    ) -> Any:
        raise ValueError(f"{type(module).__name__} fits from class-labelled features; task: anomaly has none")

    def evaluator(self, cfg: DictConfig, data: AnomalyData, module: PromptModule) -> AnomalyEvaluator:
        return AnomalyEvaluator(data.eval, sigma=float(cfg.anomaly.sigma), aupro_convention=cfg.anomaly.aupro)

    def describe(self, cfg: DictConfig, data: AnomalyData) -> str:
        return f"{data.name} ({len(data.train)} training / {len(data.eval)} evaluation images with masks)"

    def export_info(self, cfg: DictConfig, data: AnomalyData) -> dict[str, Any]:
        """``image_size`` and ``sigma``: what ``promptlab anomaly predict`` uses by default."""
        return {
            "dataset": data.name,
            "image_size": int(cfg.anomaly.image_size),
            "sigma": float(cfg.anomaly.sigma),
        }

    def record(self, cfg: DictConfig, data: AnomalyData) -> dict[str, Any]:
        a = cfg.anomaly
        return {
            "dataset": data.name,
            "split": a.eval_data.split,
            "train_data": OmegaConf.to_container(a.train_data),
            "eval_data": OmegaConf.to_container(a.eval_data),
        }

    def summary(self, metrics: dict[str, Any]) -> str:
        fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
        lines = [f"{'category':<16}" + "".join(f"{k:>13}" for k in METRICS)]
        for cat, row in [*metrics["categories"].items(), ("mean", metrics["mean"])]:
            lines.append(f"{cat:<16}" + "".join(f"{fmt(row[k]):>13}" for k in METRICS))
        return "\n".join(lines)

    def scalars(self, cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, float]:
        return {f"eval/{k}": v for k, v in metrics["mean"].items() if v is not None}
