"""The anomaly evaluator: per-category image AUROC / AP and pixel AUROC / AUPRO, and their means.

It is what :func:`promptlab.engine.evaluate` runs for ``task: anomaly`` (the
:class:`promptlab.engine.Evaluator` contract: ``observe`` each batch, then ``result``). Reference
protocol (zqhang/AnomalyCLIP test.py): one category at a time, metrics averaged over categories,
the anomaly map smoothed by a Gaussian of ``sigma`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from promptlab.anomaly.data import AnomalyItem
from promptlab.anomaly.method import AnomalyCLIP
from promptlab.metrics import AUPRO_CONVENTIONS, aupro, auroc, average_precision

METRICS = ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap")


class AnomalyEvaluator:
    """Collects image scores [N] and smoothed maps [N, H, W] of ``items`` (in order), then scores them.

    Pixel metrics are skipped (None) for a category whose anomalous images have no masks.
    """

    def __init__(
        self, items: Sequence[AnomalyItem], *, sigma: float = 4.0, aupro_convention: str = "published"
    ):
        if aupro_convention not in AUPRO_CONVENTIONS:
            raise ValueError(f"aupro={aupro_convention!r}: expected one of {AUPRO_CONVENTIONS}")
        self.items, self.sigma, self.aupro_convention = list(items), sigma, aupro_convention
        self.scores: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []
        self.gts: list[torch.Tensor] = []

    def observe(self, module: AnomalyCLIP, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        s, a = module.scores(module.outputs(inputs["images"]), self.sigma)
        self.scores.append(s.float().cpu())
        self.maps.append(a.float().cpu())
        self.gts.append(inputs["masks"][:, 0].cpu() > 0.5)

    def result(self) -> dict[str, Any]:
        scores, maps, gts = (
            torch.cat(self.scores),
            torch.cat(self.maps),
            torch.cat(self.gts),
        )  # [N], [N, H, W] x2
        items = self.items
        labels = torch.tensor([it.label for it in items])
        per_cat: dict[str, dict[str, float | None]] = {}
        for cat in sorted({it.category for it in items}):
            idx = torch.tensor([i for i, it in enumerate(items) if it.category == cat])
            row: dict[str, float | None] = {
                "image_auroc": 100 * auroc(scores[idx], labels[idx]),
                "image_ap": 100 * average_precision(scores[idx], labels[idx]),
            }
            if all(items[i].mask is not None for i in idx.tolist() if items[i].label == 1):
                row["pixel_auroc"] = 100 * auroc(maps[idx], gts[idx])
                row["pixel_aupro"] = 100 * aupro(maps[idx], gts[idx], convention=self.aupro_convention)
            else:
                row["pixel_auroc"] = row["pixel_aupro"] = None
            per_cat[cat] = row
        mean = {}
        for k in METRICS:
            vals = [r[k] for r in per_cat.values() if r[k] is not None]
            mean[k] = sum(vals) / len(vals) if vals else None
        return {
            "mean": mean,
            "categories": per_cat,
            "n": len(items),
            "aupro_convention": self.aupro_convention,
        }
