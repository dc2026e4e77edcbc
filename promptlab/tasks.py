"""Tasks: what differs between kinds of run, behind one small contract the runner calls.

A run is always the same steps (:func:`promptlab.runner.run`): prepare the data, build the backbone,
build the method, train with :func:`promptlab.engine.train`, evaluate with
:func:`promptlab.engine.evaluate`, record. A *task* (the recipe's ``task:``) decides:

- ``ensure_data(cfg)``, ``prepare(cfg)``: generate procedural data on first use, then read the data
  the run uses (an object with at least ``name`` and the ``classnames`` the method is built on);
- ``batches(cfg, data, module, train=..., ...)``: what a batch holds, ``(inputs, labels)`` with
  ``inputs`` a dict of tensors for the module's ``training_step`` and the evaluator: ``images``;
  ``image_features`` when the method's image side is frozen and cached; clips [B, T, 3, H, W] under
  ``images`` for video datasets; ``images`` and pixel ``masks`` for anomaly detection;
- ``evaluator(cfg, data)``: an :class:`promptlab.engine.Evaluator` (classification accuracy, which
  also covers multi-view video batches; per-category pixel / image metrics for anomalies);
- ``describe(cfg, data)``: the log line's account of the data; ``record(cfg, data)``: the
  ``metrics.json`` fields saying what was evaluated; ``export_info(cfg, data)``: what the prompt
  export records about its data (``prompt_config.json``); ``summary(metrics)``: the text printed at
  the end; ``scalars(cfg, metrics)``: the evaluation's TensorBoard scalars;
- ``fit_data(cfg, data, module, device=...)``: the features a training-free method's ``fit`` gets
  (:class:`promptlab.prompts.FitData`), for a method that declares ``fit_features``.

The loss is always the module's (:meth:`promptlab.prompts.PromptModule.training_step`), the loop
always the engine's. A new task implements these methods and is added to :data:`TASKS`, with its
recipe section in :mod:`promptlab.config` (``RecipeConfig.task``, ``TASK_SECTIONS``), so that its
recipes are validated like every other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from promptlab import distributed, timing
from promptlab.data import (
    DatasetSplits,
    ImageDataset,
    Item,
    fewshot_split,
    get_spec,
    load_dataset,
    subsample_classes,
)
from promptlab.data.generated import run_generator
from promptlab.engine import AccuracyEvaluator, Batch, Evaluator, FeatureBatches, ImageBatches
from promptlab.features import cached_features
from promptlab.prompts import FitData, PromptModule

log = logging.getLogger(__name__)


class Task(Protocol):
    """The contract the runner calls; see the module docstring."""

    def ensure_data(self, cfg: DictConfig) -> None: ...

    def prepare(self, cfg: DictConfig) -> Any: ...

    def batches(
        self,
        cfg: DictConfig,
        data: Any,
        module: PromptModule,
        *,
        train: bool,
        generator: torch.Generator,
        device: torch.device,
    ) -> Iterable[Batch]: ...

    def evaluator(self, cfg: DictConfig, data: Any, module: PromptModule) -> Evaluator: ...

    def describe(self, cfg: DictConfig, data: Any) -> str: ...

    def record(self, cfg: DictConfig, data: Any) -> dict[str, Any]: ...

    def export_info(self, cfg: DictConfig, data: Any) -> dict[str, Any]: ...

    def summary(self, metrics: dict[str, Any]) -> str: ...

    def scalars(self, cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, float]: ...

    def fit_data(
        self, cfg: DictConfig, data: Any, module: PromptModule, *, device: torch.device
    ) -> FitData: ...


class Classification:
    """Image or video classification on a dataset YAML (``data`` section): few-shot draws, base / new
    halves, cached image features when the method's image side is frozen, clips for video datasets."""

    def ensure_data(self, cfg: DictConfig) -> None:
        """Generate a procedural dataset on first use: its YAML names a ``generator`` (``synthetic``,
        ``sandbox_*``); the generator skips work when the files are complete. Real datasets are never touched."""
        spec = get_spec(cfg.data.name)
        if spec.generator:
            run_generator(dict(spec.generator), Path(cfg.data.root), source=f"{spec.yaml_path}: generator")

    def prepare(self, cfg: DictConfig) -> DatasetSplits:
        """The dataset, its few-shot draw for (shots, seed) and its base/new half, as the protocol says."""
        params = {"fold": int(cfg.data.get("fold", 1)), "seed": int(cfg.seed), "shots": int(cfg.shots)}
        ds = load_dataset(
            cfg.data.name, Path(cfg.data.root).expanduser(), params=params
        )  # params: video lists
        if int(cfg.shots) > 0:
            ds = fewshot_split(ds, int(cfg.shots), int(cfg.seed), cache_dir=Path(cfg.cache_dir).expanduser())
        return subsample_classes(ds, cfg.subsample)

    def batches(
        self,
        cfg: DictConfig,
        data: DatasetSplits,
        module: PromptModule,
        *,
        train: bool,
        generator: torch.Generator,
        device: torch.device,
    ) -> Iterable[Batch]:
        """Cached features when the method's image side is frozen (and the recipe allows it), else
        images; clips for a video dataset."""
        items = data.train if train else getattr(data, cfg.eval.split)
        if get_spec(cfg.data.name).modality == "video":
            return _video_batches(cfg, data, module, items, train=train, generator=generator)
        clip = module.clip
        batch_size = cfg.train.batch_size if train else cfg.eval.batch_size
        transform = clip.make_train_transform(cfg.data.crop_scale) if train else clip.eval_transform
        if module.image_side_frozen and (cfg.train.feature_cache or not train):
            views, seed = (
                (int(cfg.train.aug_views), int(cfg.seed)) if train else (1, 0)
            )  # seeds draw other views
            feats = _features(
                cfg, module, items, transform, views, seed, device, "train" if train else "test"
            )
            labels = torch.tensor([it.label for it in items], dtype=torch.long)
            return FeatureBatches(
                feats, labels, batch_size, generator, shuffle=train, shard=distributed.current_shard()
            )
        workers = int(cfg.data.num_workers)
        decoded = float(cfg.data.decoded_cache_mb) if train else 0  # read every epoch: decode once
        return ImageBatches(
            ImageDataset(items, transform, decoded_mb=decoded, threads=max(1, workers)),
            batch_size,
            generator,
            shuffle=train,
            num_workers=workers,
            shard=distributed.current_shard(),
            pin_memory=device.type == "cuda",
        )

    def evaluator(self, cfg: DictConfig, data: DatasetSplits, module: PromptModule) -> Evaluator:
        return AccuracyEvaluator(len(module.classnames))

    def describe(self, cfg: DictConfig, data: DatasetSplits) -> str:
        n_eval = len(getattr(data, cfg.eval.split))
        return f"{data.name} ({len(data.classnames)} classes, {len(data.train)} train / {n_eval} {cfg.eval.split} items)"

    def export_info(self, cfg: DictConfig, data: DatasetSplits) -> dict[str, Any]:
        return {"dataset": data.name, "shots": int(cfg.shots)}

    def record(self, cfg: DictConfig, data: DatasetSplits) -> dict[str, Any]:
        return {
            "dataset": data.name,
            "split": cfg.eval.split,
            "subsample": cfg.subsample,
            "shots": int(cfg.shots),
            "split_hash": getattr(data, "split_hash", None),
        }

    def summary(self, metrics: dict[str, Any]) -> str:
        return (
            f"{metrics['dataset']} {metrics['split']} accuracy: {metrics['accuracy']:.2f}% (n={metrics['n']})"
        )

    def scalars(self, cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, float]:
        return {f"{cfg.eval.split}/accuracy": metrics["accuracy"]}

    def fit_data(
        self, cfg: DictConfig, data: DatasetSplits, module: PromptModule, *, device: torch.device
    ) -> FitData:
        """The training split's features as ``module.fit_features`` asks (views drawn with the run's seed,
        as training batches are), and the validation split's (evaluation transform) for its searches. A
        dataset without a validation split (ImageNet) lends the training features: a search never sees
        the test split."""
        req, clip = module.fit_features, module.clip
        assert req is not None
        transform = clip.make_train_transform(cfg.data.crop_scale) if req.augment else clip.eval_transform
        seed = int(cfg.seed) if req.augment else 0
        train = _features(
            cfg, module, data.train, transform, int(req.views), seed, device, "fit"
        )  # [V, N, D]
        train_labels = torch.tensor([it.label for it in data.train], dtype=torch.long)
        if data.val:
            val = _features(cfg, module, data.val, clip.eval_transform, 1, 0, device, "val")[0]  # [M, D]
            val_labels, split = torch.tensor([it.label for it in data.val], dtype=torch.long), "val"
        else:
            log.warning(
                "%s has no validation split: %s searches on the training features",
                data.name,
                type(module).__name__,
            )
            val, val_labels, split = train[0], train_labels, "train"
        return FitData(
            train.to(device), train_labels.to(device), val.to(device), val_labels.to(device), split
        )


def _features(
    cfg: DictConfig,
    module: PromptModule,
    items: list[Item],
    transform: Callable,
    views: int,
    seed: int,
    device: torch.device,
    what: str,
) -> torch.Tensor:
    """[V, N, D] image features of ``items`` through the feature cache (V views drawn with ``seed``)."""
    clip = module.clip
    with (
        distributed.main_first(),
        timing.phase("features"),
    ):  # DDP: rank 0 encodes and caches, the others read
        return cached_features(
            module.encode_image,
            items,
            transform,
            fingerprint=f"{clip.arch}:{clip.fingerprint()}",
            cache_dir=Path(cfg.cache_dir).expanduser(),
            views=views,
            seed=seed,
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
            device=device,
            desc=f"{what} features",
            decoded_mb=float(cfg.data.decoded_cache_mb) if views > 1 else 0,  # one decode for V views
        )


def _video_batches(
    cfg: DictConfig,
    data: DatasetSplits,
    module: PromptModule,
    items: list[Item],
    *,
    train: bool,
    generator: torch.Generator,
):
    """Clips of T frames (``video`` section of the recipe); test batches hold every view of a video."""
    from promptlab.video.data import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, VideoBatches, VideoDataset

    clip, v = module.clip, cfg.video
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if v.normalize == "imagenet" else (clip.image_mean, clip.image_std)
    )
    transform = ClipTransform(
        clip.image_size, mean, std, train=train, crops=1 if train else int(v.test_crops)
    )
    dataset = VideoDataset(items, int(v.num_frames), transform, clips=1 if train else int(v.test_clips))
    return VideoBatches(
        dataset,
        cfg.train.batch_size if train else cfg.eval.batch_size,
        generator,
        shuffle=train,
        num_workers=cfg.data.num_workers,
        shard=distributed.current_shard(),
        num_classes=len(data.classnames),
        mixup=float(v.mixup),
        cutmix=float(v.cutmix),
        switch_prob=float(v.mix_switch_prob),
    )


def _anomaly() -> Task:
    from promptlab.anomaly.task import AnomalyDetection

    return AnomalyDetection()


#: ``task:`` of a recipe -> the task (built on first use: the anomaly task imports its own data code).
TASKS: dict[str, Callable[[], Task]] = {"classification": Classification, "anomaly": _anomaly}


def task_for(cfg: DictConfig) -> Task:
    """The task a recipe names (``task:``, default ``classification``)."""
    name = str(cfg.get("task", "classification"))
    if name not in TASKS:
        raise ValueError(f"task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]()
