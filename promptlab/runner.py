"""One run of a recipe: prepare data -> build the backbone -> build the method -> train -> evaluate -> record.

This is the glue the CLI's ``run`` calls, the same steps for every task (classification, video,
anomaly detection): what differs between tasks (which data, what a batch holds, which evaluator) is
in :mod:`promptlab.tasks`; the loop is :mod:`promptlab.engine`; the run directory records what
produced the result.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import promptlab
from promptlab import distributed, timing
from promptlab.backbones import load_backbone, load_clip, save_clip
from promptlab.clip import FrozenCLIP
from promptlab.config import ConfigError, epochs_for, eval_amp, instantiate, load_recipe, resolve_component
from promptlab.data import DatasetSplits
from promptlab.engine import evaluate, load_checkpoint, make_schedule, seed_everything, steps_per_epoch, train
from promptlab.export import load_prompts, read_prompt_config, resolve_export_dir, save_prompts
from promptlab.io import atomic_write_json
from promptlab.prompts import PromptModule
from promptlab.rundir import claim_run_dir
from promptlab.runlog import close_file_logging, file_logging, record_failure
from promptlab.tasks import Classification, Task, task_for

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


def build_method(cfg: DictConfig, clip: FrozenCLIP, ds: Any) -> PromptModule:
    """Instantiate ``cfg.method`` on the classes of the task's data ``ds`` (``ds.classnames``).

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
    """Generate the recipe's procedural data on first use (its task knows where); real data is never touched."""
    with timing.phase("data"):
        task_for(cfg).ensure_data(cfg)


def prepare_data(cfg: DictConfig) -> DatasetSplits:
    """A classification recipe's dataset, few-shot draw and base/new half (:class:`promptlab.tasks.Classification`)."""
    return Classification().prepare(cfg)


def run_recipe(
    path: Path, overrides: list[str], *, overwrite: bool = False
) -> tuple[DictConfig, dict[str, Any]]:
    """``promptlab run``: load the recipe, generate its procedural data, check its paths, run it."""
    cfg = load_recipe(path, overrides, check_paths=False)
    timing.reset()
    ensure_data(cfg)  # generated data exists before its paths are checked
    cfg = load_recipe(path, overrides, check_paths=True)
    return cfg, run(cfg, overwrite=overwrite)


def run(cfg: DictConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Prepare the data, build the backbone, build the method, train (if the recipe has epochs),
    evaluate the last-epoch model, record; returns the metrics. Every task (``cfg.task``) runs these
    same steps; what differs between tasks is in their :class:`promptlab.tasks.Task`.

    Launched by ``torchrun``, every process runs this; ``train.batch_size`` is the global batch,
    and only rank 0 writes into the run directory. Rank 0 first claims the run directory
    (:func:`promptlab.rundir.claim_run_dir`): it refuses a directory in use or holding another run
    (unless ``overwrite``, or ``resume=true`` with the same configuration) and writes ``config.yaml``.
    """
    dist_info = distributed.init_from_env(cfg.device)  # no-op without torchrun
    run_dir = Path(cfg.output_dir)
    claim = claim_run_dir(run_dir, cfg, overwrite=overwrite) if distributed.is_main() else None
    handler = file_logging(run_dir) if distributed.is_main() else None
    t0 = time.time()
    try:
        task = task_for(cfg)
        seed_everything(int(cfg.seed))
        device = distributed.local_device(resolve_device(cfg.device), dist_info)
        with timing.phase("data"):
            data = task.prepare(cfg)
        with timing.phase("setup"):
            clip = load_backbone(cfg.model, device=device)
            clip.grad_checkpointing = bool(cfg.train.grad_checkpointing)
            seed_everything(int(cfg.seed))  # model init draws (random context) depend on the seed only
            module = build_method(cfg, clip, data).to(device)
            module.match_backbone_precision()  # reference_fp16: learned tensors in fp16, as the reference's
        log.info("run %s: %s on %s, %s", run_dir, type(module).__name__, task.describe(cfg, data), device)
        g = torch.Generator().manual_seed(int(cfg.seed))
        epochs = epochs_for(cfg)
        fit = {}
        if module.fit_features is not None:  # a training-free fit (and the start of a fine-tuning stage)
            fit = {"fit": _fit(cfg, task, data, module, device)}
        trains = (epochs > 0 or _max_steps(cfg) is not None) and bool(module.trainable_parameters())
        with _tensorboard(run_dir) if trains and distributed.is_main() else nullcontext() as writer:
            with timing.phase("train"):
                train_info = (
                    _train(cfg, task, data, module, device, g, writer) if trains else {"epochs": epochs}
                )
            train_info.update(fit)
            with timing.phase("eval"):
                metrics = evaluate(
                    module,
                    task.batches(cfg, data, module, train=False, generator=g, device=device),
                    device=device,
                    amp=eval_amp(cfg),
                    evaluator=task.evaluator(cfg, data, module),
                )
            for key, value in task.scalars(cfg, metrics).items() if writer is not None else ():
                writer.add_scalar(key, value, epochs)
        return _record(cfg, task, data, module, metrics, train_info, dist_info.world_size, t0)
    except Exception as e:
        record_failure(handler, e)  # log.txt says why the run stopped (NaN loss, disk full, ...)
        raise
    finally:
        close_file_logging(handler)
        if claim is not None:
            claim.release()
        if dist_info.owns_group:
            distributed.shutdown()


def _tensorboard(run_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"))


def _fit(
    cfg: DictConfig, task: Task, data: Any, module: PromptModule, device: torch.device
) -> dict[str, Any]:
    """``module.fit`` on the features its ``fit_features`` asks for (:meth:`Task.fit_data`); its record."""
    with timing.phase("features"):
        fit_data = task.fit_data(cfg, data, module, device=device)
    with torch.no_grad():
        record = module.fit(fit_data)
    module.match_backbone_precision()  # tensors fit() created take the reference's dtype too
    return {"val_split": fit_data.val_split, **record}


def _max_steps(cfg: DictConfig) -> int | None:
    """The run's optimizer-step budget, ``train.steps_per_shot x shots`` (CLIP-LoRA), or None."""
    return int(cfg.train.get("steps_per_shot", 0)) * int(cfg.shots) or None


def _train(
    cfg: DictConfig,
    task: Task,
    data: Any,
    module: PromptModule,
    device: torch.device,
    g: torch.Generator,
    writer: Any,
) -> dict[str, Any]:
    """The recipe's optimizer, batches and lr schedule around :func:`promptlab.engine.train`."""
    tc, epochs, max_steps = cfg.train, epochs_for(cfg), _max_steps(cfg)
    optimizer = instantiate(cfg.optimizer, module.optimizer_param_groups(), kind="optimizer")
    batches = task.batches(cfg, data, module, train=True, generator=g, device=device)
    budget = {}
    if max_steps:  # as many epochs as the step budget needs; the last one is cut
        epochs = math.ceil(
            max_steps / max(1, steps_per_epoch(len(batches), tc.grad_accum_steps, tc.drop_partial_accum))
        )
        budget = {"max_steps": max_steps}
    schedule = make_schedule(
        tc.lr_schedule,
        base_lr=optimizer.param_groups[0]["lr"],
        epochs=epochs,
        batches_per_epoch=len(batches),
        accum=tc.grad_accum_steps,
        drop_partial=tc.drop_partial_accum,
        warmup_epochs=tc.warmup_epochs,
        warmup_lr=tc.warmup_lr,
        warmup_type=tc.warmup_type,
        min_lr_ratio=tc.min_lr_ratio,
        max_steps=max_steps,
    )
    result = train(
        module,
        batches,
        optimizer,
        epochs=epochs,
        lr_schedule=schedule,
        generator=g,
        run_dir=Path(cfg.output_dir),
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
        max_steps=max_steps,
    )
    after = module.after_train()  # e.g. Tip-Adapter-F's search with its trained keys
    return {
        "epochs": epochs,
        **budget,
        "last_loss": result.last_loss,
        "resumed_from_epoch": result.resumed_from,
        **({"after": after} if after else {}),
    }


def _record(
    cfg: DictConfig,
    task: Task,
    data: Any,
    module: PromptModule,
    metrics: dict[str, Any],
    train_info: dict[str, Any],
    world_size: int,
    t0: float,
) -> dict[str, Any]:
    """Export the prompts (and a tuned backbone) and write ``metrics.json`` on rank 0; returns the metrics."""
    clip, run_dir = module.clip, Path(cfg.output_dir)
    export_dir = run_dir / "prompts"
    if distributed.is_main():
        save_prompts(module, export_dir, extra={"seed": int(cfg.seed), **task.export_info(cfg, data)})
        if module.trainable_backbone_parts and "last_loss" in train_info:  # a checkpoint load_clip reads
            log.info(
                "tuned backbone -> %s (use it as model.pretrained)", save_clip(clip, run_dir / "backbone")
            )
    out = {
        **task.record(cfg, data),
        "seed": int(cfg.seed),
        **metrics,
        "train": train_info,
        "method": type(module).__name__,
        "arch": clip.arch,
        "pretrained": clip.pretrained,
        "weights_fingerprint": clip.fingerprint(),
        "promptlab_version": promptlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        # CPU runs are bit-reproducible for one thread count, not across them (a matmul's sums split
        # differently): `--jobs 2` gives each job half the cores
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(time.time() - t0, 2),
        "timing_s": timing.take(),  # exclusive seconds per phase (promptlab.timing), data generation included
        "peak_memory_mb": _peak_memory_mb(clip.device),
        "prompts": str(export_dir),
        "git_commit": git_commit(),
        "world_size": world_size,
    }
    if distributed.is_main():
        atomic_write_json(run_dir / "metrics.json", out)
    log.info("%s -> %s", task.summary(out), run_dir / "metrics.json")
    return out


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
        if cfg.task != "classification":
            raise ValueError(
                f"{path}: a `task: {cfg.task}` run; evaluate its prompts with `promptlab anomaly eval`"
            )
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
    timing.reset()
    ensure_data(cfg)
    device = resolve_device(cfg.device)
    eval_cfg = cfg.copy()
    eval_cfg.shots = (
        0 if cfg.eval.split == "test" else cfg.shots
    )  # the test split is never subsampled by shots
    with timing.phase("data"):
        ds = prepare_data(eval_cfg)
    hparams = _eval_dataset_hparams(prompts_dir, cfg.method, ds)
    backbone = sorted({o.split("=", 1)[0].strip() for o in overrides} & {"model", *_BACKBONE_KEYS})
    with timing.phase("setup"):
        if backbone:  # honour model.* overrides: the prompts go onto the backbone asked for, if shapes agree
            clip = load_backbone(cfg.model, device=device)
            same_weights = not set(backbone) & {"model", "model.arch", "model.pretrained"}
            module = load_prompts(prompts_dir, clip, strict_weights=same_weights, hparams=hparams).to(device)
        else:
            module = load_prompts_dir(prompts_dir, device=device, hparams=hparams).to(device)
        module.set_classnames(ds.classnames)  # refuses classes a class-bound method did not learn
    with timing.phase("eval"):
        metrics = evaluate(
            module,
            Classification().batches(
                cfg, ds, module, train=False, generator=torch.Generator(), device=device
            ),
            device=device,
            amp=eval_amp(cfg),
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
        "timing_s": timing.take(),
    }
    atomic_write_json(path / f"eval_{ds.name}_{cfg.subsample}_{cfg.eval.split}.json", out)
    return out


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Re-export a run's prompts from its last checkpoint (e.g. after an interrupted run)."""
    cfg = load_recipe(_need(run_dir / "config.yaml"), check_paths=False)
    ckpt = load_checkpoint(_need(run_dir / "checkpoints" / "last.pt"))
    task = task_for(cfg)
    data = task.prepare(cfg)
    clip = load_backbone(cfg.model)
    module = build_method(cfg, clip, data)
    module.load_prompt_state_dict(ckpt["prompt_state"], source=str(run_dir / "checkpoints" / "last.pt"))
    extra = {"seed": int(cfg.seed), **task.export_info(cfg, data), "epoch": int(ckpt["epoch"])}
    return save_prompts(module, out or run_dir / "prompts", extra=extra)
