"""One run of a recipe: config -> data -> CLIP -> method -> train -> evaluate -> metrics and export.

This is the glue the CLI's ``run`` calls. Everything it does is a call into one module that owns
the concern (data, features, engine, export); the run directory records what produced the result.
"""

from __future__ import annotations

import inspect
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import promptlab
from promptlab import distributed
from promptlab.backbones import load_clip, save_clip
from promptlab.clip import FrozenCLIP
from promptlab.config import ConfigError, epochs_for, instantiate, load_recipe, resolve_component
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
from promptlab.engine import (
    FeatureBatches,
    ImageBatches,
    evaluate,
    load_checkpoint,
    make_schedule,
    seed_everything,
    train,
)
from promptlab.export import load_prompts, read_prompt_config, resolve_export_dir, save_prompts
from promptlab.features import cached_features
from promptlab.io import atomic_write_json
from promptlab.prompts import PromptModule
from promptlab.rundir import claim_run_dir
from promptlab.runlog import close_file_logging, file_logging, record_failure

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request on a machine without one fails clearly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)


def dataset_kwargs(cls: type, method_cfg: DictConfig, ds: DatasetSplits) -> dict[str, Any]:
    """Dataset facts a method may ask for by naming them in ``__init__``, unless the recipe sets them.

    ``template``: the dataset's hand-crafted prompt (zero-shot, KgCoOp); ``dataset_name``: the
    dataset's name (e.g. to look up its template groups); ``all_classnames``: every class name of the
    dataset, base and new, also when training on the base half (MoCoOp's text-to-text loss).
    """
    available: dict[str, Callable[[], Any]] = {
        "template": lambda: ds.template,
        "dataset_name": lambda: ds.name,
        "all_classnames": lambda: list(getattr(ds, "all_classnames", None) or ds.classnames),
    }
    params = inspect.signature(cls).parameters
    return {k: get() for k, get in available.items() if k in params and method_cfg.get(k) is None}


def build_method(cfg: DictConfig, clip: FrozenCLIP, ds: DatasetSplits) -> PromptModule:
    """Instantiate ``cfg.method`` on the dataset's classes.

    A recipe value the method did not use (``n_ctx`` beside a ``ctx_init`` of another length: the
    words set the length) is refused, so a run's ``config.yaml`` never describes a model that was
    not built.

    Raises:
        ConfigError: naming the ``method.*`` key whose value was not used, and the value that was.
    """
    cls = resolve_component(cfg.method._component_, "method")
    module = instantiate(
        cfg.method, clip, ds.classnames, kind="method", **dataset_kwargs(cls, cfg.method, ds)
    )
    for k, used in module.hparams.items():
        asked = cfg.method.get(k)
        if isinstance(asked, (bool, int, float, str)) and asked != used:
            raise ConfigError(
                f"{k}={asked!r} is not what {type(module).__name__} used ({k}={used!r}; see the warning "
                "above); set it to that value, or change the setting that overrides it",
                key=f"method.{k}",
            )
    return module


def ensure_data(cfg: DictConfig) -> None:
    """Generate a procedural dataset on first use: its YAML names a ``generator`` (``synthetic``,
    ``sandbox_*``); the generator skips work when the files are complete. Real datasets are never touched."""
    spec = get_spec(cfg.data.name)
    if spec.generator:
        run_generator(dict(spec.generator), Path(cfg.data.root), source=f"{spec.yaml_path}: generator")


def prepare_data(cfg: DictConfig) -> DatasetSplits:
    """The dataset, its few-shot draw for (shots, seed) and its base/new half, as the protocol says."""
    params = {
        "fold": int(cfg.data.get("fold", 1)),
        "seed": int(cfg.seed),
        "shots": int(cfg.shots),
    }  # video list names
    ds = load_dataset(cfg.data.name, Path(cfg.data.root).expanduser(), params=params)
    if int(cfg.shots) > 0:
        ds = fewshot_split(ds, int(cfg.shots), int(cfg.seed), cache_dir=Path(cfg.cache_dir).expanduser())
    return subsample_classes(ds, cfg.subsample)


@dataclass
class _Setup:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    clip: FrozenCLIP
    ds: DatasetSplits
    module: PromptModule


def _batches(s: _Setup, items: list[Item], *, train_mode: bool, generator: torch.Generator):
    """Cached features when the method's image side is frozen (and the recipe allows it), else images;
    clips for a video dataset."""
    cfg, clip, module = s.cfg, s.clip, s.module
    if get_spec(cfg.data.name).modality == "video":
        return _video_batches(s, items, train_mode=train_mode, generator=generator)
    batch_size = cfg.train.batch_size if train_mode else cfg.eval.batch_size
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    train_tf = clip.make_train_transform(cfg.data.crop_scale)
    if module.image_side_frozen and (cfg.train.feature_cache or not train_mode):
        transform = train_tf if train_mode else clip.eval_transform
        views = int(cfg.train.aug_views) if train_mode else 1
        with distributed.main_first():  # DDP: rank 0 encodes and caches, the others read the cache
            feats = cached_features(
                module.encode_image,
                items,
                transform,
                fingerprint=f"{clip.arch}:{clip.fingerprint()}",
                cache_dir=Path(cfg.cache_dir).expanduser(),
                views=views,
                seed=int(cfg.seed) if train_mode else 0,  # training views differ between seeds
                batch_size=cfg.eval.batch_size,
                num_workers=cfg.data.num_workers,
                device=s.device,
                desc="train features" if train_mode else "test features",
            )
        return FeatureBatches(
            feats, labels, batch_size, generator, shuffle=train_mode, shard=distributed.current_shard()
        )
    transform = train_tf if train_mode else clip.eval_transform
    return ImageBatches(
        ImageDataset(items, transform),
        batch_size,
        generator,
        shuffle=train_mode,
        num_workers=cfg.data.num_workers,
        shard=distributed.current_shard(),
    )


def _video_batches(s: _Setup, items: list[Item], *, train_mode: bool, generator: torch.Generator):
    """Clips of T frames (``video`` section of the recipe); test batches hold every view of a video."""
    from promptlab.video.data import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, VideoBatches, VideoDataset

    cfg, clip, v = s.cfg, s.clip, s.cfg.video
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if v.normalize == "imagenet" else (clip.image_mean, clip.image_std)
    )
    transform = ClipTransform(
        clip.image_size, mean, std, train=train_mode, crops=1 if train_mode else int(v.test_crops)
    )
    dataset = VideoDataset(items, int(v.num_frames), transform, clips=1 if train_mode else int(v.test_clips))
    return VideoBatches(
        dataset,
        cfg.train.batch_size if train_mode else cfg.eval.batch_size,
        generator,
        shuffle=train_mode,
        num_workers=cfg.data.num_workers,
        shard=distributed.current_shard(),
        num_classes=len(s.ds.classnames),
        mixup=float(v.mixup),
        cutmix=float(v.cutmix),
        switch_prob=float(v.mix_switch_prob),
    )


def run(cfg: DictConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Train (if the recipe has epochs) and evaluate the last-epoch model; returns the metrics.

    Launched by ``torchrun``, every process runs this; ``train.batch_size`` is the global batch,
    and only rank 0 writes into the run directory. Rank 0 first claims the run directory
    (:func:`promptlab.rundir.claim_run_dir`): it refuses a directory in use or holding another run
    (unless ``overwrite``, or ``resume=true`` with the same configuration) and writes ``config.yaml``.
    """
    dist_info = distributed.init_from_env(cfg.device)  # no-op without torchrun
    is_main = distributed.is_main()
    run_dir = Path(cfg.output_dir)
    claim = claim_run_dir(run_dir, cfg, overwrite=overwrite) if is_main else None
    handler = file_logging(run_dir) if is_main else None
    t0 = time.time()
    try:
        seed_everything(int(cfg.seed))
        device = distributed.local_device(resolve_device(cfg.device), dist_info)
        ds = prepare_data(cfg)
        clip = load_clip(cfg.model.arch, cfg.model.pretrained, device=device, precision=cfg.model.precision)
        clip.grad_checkpointing = bool(cfg.train.grad_checkpointing)
        seed_everything(int(cfg.seed))  # model init draws (random context) depend on the seed only
        module = build_method(cfg, clip, ds).to(device)
        module.match_backbone_precision()  # reference_fp16: learned tensors in fp16, as the reference's
        s = _Setup(cfg, run_dir, device, clip, ds, module)
        log.info(
            "run %s: %s on %s (%d classes, %d train / %d test images), %s",
            run_dir,
            type(module).__name__,
            ds.name,
            len(ds.classnames),
            len(ds.train),
            len(getattr(ds, cfg.eval.split)),
            device,
        )

        epochs = epochs_for(cfg)
        g = torch.Generator().manual_seed(int(cfg.seed))
        train_info: dict[str, Any] = {"epochs": epochs}
        if epochs > 0 and module.trainable_parameters():
            from torch.utils.tensorboard import SummaryWriter

            optimizer = instantiate(cfg.optimizer, module.optimizer_param_groups(), kind="optimizer")
            tc = cfg.train
            train_batches = _batches(s, ds.train, train_mode=True, generator=g)
            schedule = make_schedule(
                tc.lr_schedule,
                base_lr=optimizer.param_groups[0]["lr"],
                epochs=epochs,
                batches_per_epoch=len(train_batches),
                accum=tc.grad_accum_steps,
                drop_partial=tc.drop_partial_accum,
                warmup_epochs=tc.warmup_epochs,
                warmup_lr=tc.warmup_lr,
                warmup_type=tc.warmup_type,
                min_lr_ratio=tc.min_lr_ratio,
            )
            with SummaryWriter(str(run_dir / "tb")) if is_main else nullcontext() as writer:
                result = train(
                    module,
                    train_batches,
                    optimizer,
                    epochs=epochs,
                    lr_schedule=schedule,
                    generator=g,
                    run_dir=run_dir,
                    device=device,
                    amp=tc.amp,
                    grad_clip=tc.grad_clip,
                    checkpoint_every=tc.checkpoint_every,
                    log_every=tc.log_every,
                    resume=bool(cfg.resume),
                    writer=writer,
                    grad_accum_steps=tc.grad_accum_steps,
                    drop_partial_accum=tc.drop_partial_accum,
                    profile_steps=tc.profile_steps,
                )
                train_info.update(last_loss=result.last_loss, resumed_from_epoch=result.resumed_from)
                metrics = evaluate(
                    module,
                    _batches(s, getattr(ds, cfg.eval.split), train_mode=False, generator=g),
                    device=device,
                    amp=tc.amp,
                )
                if writer is not None:
                    writer.add_scalar(f"{cfg.eval.split}/accuracy", metrics["accuracy"], epochs)
        else:
            metrics = evaluate(
                module,
                _batches(s, getattr(ds, cfg.eval.split), train_mode=False, generator=g),
                device=device,
                amp=cfg.train.amp,
            )
        export_dir = run_dir / "prompts"
        if is_main:
            save_prompts(
                module, export_dir, extra={"dataset": ds.name, "seed": int(cfg.seed), "shots": int(cfg.shots)}
            )
            if (
                module.trainable_backbone_parts and "last_loss" in train_info
            ):  # tuned backbone: a checkpoint load_clip reads
                log.info(
                    "tuned backbone -> %s (use it as model.pretrained)", save_clip(clip, run_dir / "backbone")
                )
        out = {
            "dataset": ds.name,
            "split": cfg.eval.split,
            "subsample": cfg.subsample,
            "shots": int(cfg.shots),
            "seed": int(cfg.seed),
            **metrics,
            "train": train_info,
            "method": type(module).__name__,
            "arch": clip.arch,
            "pretrained": clip.pretrained,
            "weights_fingerprint": clip.fingerprint(),
            "split_hash": getattr(ds, "split_hash", None),
            "promptlab_version": promptlab.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "wall_time_s": round(time.time() - t0, 2),
            "peak_memory_mb": _peak_memory_mb(device),
            "prompts": str(export_dir),
            "git_commit": git_commit(),
            "world_size": dist_info.world_size,
        }
        if is_main:
            atomic_write_json(run_dir / "metrics.json", out)
        log.info(
            "%s accuracy %.2f%% (n=%d) -> %s",
            cfg.eval.split,
            metrics["accuracy"],
            metrics["n"],
            run_dir / "metrics.json",
        )
        return out
    except Exception as e:
        record_failure(handler, e)  # log.txt says why the run stopped (NaN loss, disk full, ...)
        raise
    finally:
        close_file_logging(handler)
        if claim is not None:
            claim.release()
        if dist_info.owns_group:
            distributed.shutdown()


def git_commit() -> str | None:
    """The commit of the promptlab checkout this code runs from, read from ``.git`` (no git process).

    ``None`` for an installed (non-checkout) package; the version is recorded beside it anyway.
    """
    root = Path(__file__).resolve().parent.parent
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: ".git" names the real git directory
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        common = (
            (git / (git / "commondir").read_text().strip()).resolve()
            if (git / "commondir").is_file()
            else git
        )
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head  # detached HEAD
        ref = head.split(None, 1)[1]
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def load_prompts_dir(
    prompts_dir: Path,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    hparams: dict[str, Any] | None = None,
) -> PromptModule:
    """A prompts directory (or a run directory holding ``prompts/``) on the backbone recorded in it (or
    on ``pretrained`` weights given instead), in the precision it was trained in (``reference_fp16``
    prompts are evaluated in fp16, as there)."""
    prompts_dir = resolve_export_dir(Path(prompts_dir))
    meta = read_prompt_config(prompts_dir)
    precision = meta.get("precision", "fp32")
    clip = load_clip(meta["arch"], pretrained or meta.get("pretrained"), device=device, precision=precision)
    return load_prompts(prompts_dir, clip, strict_weights=pretrained is None, hparams=hparams)


def _eval_dataset_hparams(prompts_dir: Path, method_cfg: DictConfig, ds: DatasetSplits) -> dict[str, Any]:
    """The target dataset's ``template`` for a method that took its source dataset's (zero-shot CLIP,
    KgCoOp, ViFi-CLIP), when prompts are evaluated on another dataset and the recipe did not fix it.

    ``dataset_name`` is not refilled: it selects learned structure (MoCoOp's experts per template group).
    """
    meta = read_prompt_config(prompts_dir)
    if meta.get("dataset") in (None, ds.name) or "template" not in (meta.get("hparams") or {}):
        return {}
    return {} if method_cfg.get("template") is not None else {"template": ds.template}


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return path


_BACKBONE_KEYS = ("model.arch", "model.pretrained", "model.precision")


def eval_prompts(path: Path, overrides: list[str]) -> dict[str, Any]:
    """Evaluate a run directory's (or a prompts directory's) learned prompts, e.g. on new classes or another dataset.

    A run directory brings its own resolved config; ``key=value`` overrides change the dataset
    (``data.name``, ``data.root``), ``subsample`` (base -> new) or ``eval.split``. A bare prompts
    directory needs ``data.root`` and ``data.name``. ``model.arch`` / ``model.pretrained`` /
    ``model.precision`` put the prompts on another backbone (its widths must match; other weights
    are allowed, with a warning) and are recorded in the result.
    """
    run_cfg = path / "config.yaml"
    prompts_dir = path / "prompts" if run_cfg.exists() else path
    if run_cfg.exists():
        cfg = load_recipe(run_cfg, overrides, check_paths=False)
    else:
        meta = read_prompt_config(prompts_dir)
        base = OmegaConf.create(
            {
                "output_dir": str(path),
                "model": {"arch": meta["arch"], "pretrained": meta.get("pretrained")},
                "method": {"_component_": "promptlab.methods.ZeroShotCLIP"},
                "data": {"root": "", "name": meta.get("dataset", ""), "num_workers": 0},
                "shots": 0,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:  # load_recipe reads files: give it the base config as one
            (Path(tmp) / "eval.yaml").write_text(OmegaConf.to_yaml(base))
            cfg = load_recipe(Path(tmp) / "eval.yaml", overrides, check_paths=False)
    ensure_data(cfg)
    device = resolve_device(cfg.device)
    eval_cfg = cfg.copy()
    eval_cfg.shots = (
        0 if cfg.eval.split == "test" else cfg.shots
    )  # the test split is never subsampled by shots
    ds = prepare_data(eval_cfg)
    hparams = _eval_dataset_hparams(prompts_dir, cfg.method, ds)
    backbone = sorted({o.split("=", 1)[0].strip() for o in overrides} & {"model", *_BACKBONE_KEYS})
    if backbone:  # honour model.* overrides: the prompts go onto the backbone asked for, if shapes agree
        clip = load_clip(cfg.model.arch, cfg.model.pretrained, device=device, precision=cfg.model.precision)
        same_weights = not set(backbone) & {"model", "model.arch", "model.pretrained"}
        module = load_prompts(prompts_dir, clip, strict_weights=same_weights, hparams=hparams).to(device)
    else:
        module = load_prompts_dir(prompts_dir, device=device, hparams=hparams).to(device)
    module.set_classnames(ds.classnames)  # refuses classes a class-bound method did not learn
    s = _Setup(cfg, path, device, module.clip, ds, module)
    metrics = evaluate(
        module,
        _batches(s, getattr(ds, cfg.eval.split), train_mode=False, generator=torch.Generator()),
        device=device,
    )
    out = {
        "dataset": ds.name,
        "subsample": cfg.subsample,
        "split": cfg.eval.split,
        **metrics,
        "prompts": str(prompts_dir),
        "arch": module.clip.arch,
        "pretrained": module.clip.pretrained,
        "weights_fingerprint": module.clip.fingerprint(),
        "backbone_overrides": backbone,
        "split_hash": ds.split_hash,
        "promptlab_version": promptlab.__version__,
        "git_commit": git_commit(),
    }
    atomic_write_json(path / f"eval_{ds.name}_{cfg.subsample}_{cfg.eval.split}.json", out)
    return out


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Re-export a run's prompts from its last checkpoint (e.g. after an interrupted run)."""
    cfg = load_recipe(_need(run_dir / "config.yaml"), check_paths=False)
    ckpt = load_checkpoint(_need(run_dir / "checkpoints" / "last.pt"))
    ds = prepare_data(cfg)
    clip = load_clip(cfg.model.arch, cfg.model.pretrained, precision=cfg.model.precision)
    module = build_method(cfg, clip, ds)
    module.load_prompt_state_dict(ckpt["prompt_state"], source=str(run_dir / "checkpoints" / "last.pt"))
    return save_prompts(
        module, out or run_dir / "prompts", extra={"dataset": ds.name, "epoch": int(ckpt["epoch"])}
    )
