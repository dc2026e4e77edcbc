"""Recipes: load a YAML file, apply ``key=value`` overrides, validate it, build its components.

A recipe is plain data. Its plain sections (``model``, ``data``, ``train``, ``eval`` and the top-level
scalars) are described by the dataclasses below, which are the single source of truth for the recipe
format. Its ``_component_`` sections (``method``, ``optimizer``) name a Python callable by dotted path;
their other keys are that callable's keyword arguments and are validated against its signature, so a
typo in a recipe fails at load time, naming the key and the file, instead of deep inside a run
(torchtune's ``instantiate`` idea, without reading the caller's frame globals or touching ``sys.path``).

Example:
    >>> cfg = load_recipe("recipes/fewshot/coop_vit_b16.yaml", ["shots=4", "data.root=/data"])
    >>> module = instantiate(cfg.method, clip, classnames)          # CoOp(clip, classnames, n_ctx=16, ...)
    >>> optim = instantiate(cfg.optimizer, module.parameters())     # SGD(params, lr=0.002, ...)
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from promptlab.components import COMPONENT_KEY, ConfigError, check_component_path, resolve_component
from promptlab.suggest import did_you_mean

__all__ = [
    "AnomalyConfig",
    "AnomalyDataConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LauncherConfig",
    "ModelConfig",
    "RecipeConfig",
    "TrainConfig",
    "VideoConfig",
    "component_kwargs",
    "epochs_for",
    "instantiate",
    "load_recipe",
    "resolve_component",
    "validate_recipe",
]

Precision = Literal["fp32", "fp16", "bf16"]
# model.precision: how the frozen CLIP is stored, plus the references' pure-fp16 mode (promptlab.clip)
ModelPrecision = Literal["fp32", "fp16", "bf16", "reference_fp16"]


# --------------------------------------------------------------------------------------------------
# Schema. Field metadata: ``component=(runtime args...)`` marks a ``_component_`` node and lists the
# arguments the engine passes at build time (excluded from validation), ``kind=`` its role under the
# trust rule (promptlab.trust); ``min=`` the smallest number allowed; ``pattern=(regex, description)``
# constrains a string; ``path=True`` marks a value that must exist when ``check_paths`` is on.
# Fields without a default are required; defaulted fields may be left out and are filled in on load.
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The frozen CLIP backbone (see ``promptlab.load_clip``)."""

    arch: str  # open_clip model name (ViT-B-16, RN50, ...) or "tiny" (random tiny CLIP for demos/tests)
    # open_clip tag ("openai"), local checkpoint, OpenAI-format .pt, or HF CLIP directory; null = random
    pretrained: str | None = None
    # fp32; fp16 / bf16: frozen weights stored in that dtype (learned tensors fp32); reference_fp16: the
    # CoOp-family references' PREC=fp16 (fp16 CLIP with fp32 LayerNorms, fp16 learned tensors stepped in
    # fp16, fp16 logits); use it with train.amp=fp32. See the README's "Precision".
    precision: ModelPrecision = "fp32"
    # a local Hugging Face tokenizer folder replacing the model's own (SigLIP's is fetched from the Hub)
    tokenizer: str | None = None


@dataclass
class DataConfig:
    """Where the images are and which dataset reader to use."""

    root: str = field(metadata={"path": True})  # $DATA in CoOp's DATASETS.md layout; must exist
    name: str  # a dataset under datasets/ (oxford_pets, imagenet, ..., synthetic)
    num_workers: int = field(default=4, metadata={"min": 0})  # DataLoader workers
    # MB of decoded training images kept in memory across epochs (exact: crops still come from the original
    # pixels; images beyond the budget are decoded from their files every epoch); 0 = decode every time
    decoded_cache_mb: float = field(default=2048, metadata={"min": 0})
    # RandomResizedCrop area range of the training transform; CoOp/Dassl: [0.08, 1.0]. Tiny images
    # (the 48 px sandbox) lose their content at 8 % crops and use a milder range.
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # official split 1..3 of video datasets (UCF101, HMDB51): fills `{fold}` in their list names
    fold: int = field(default=1, metadata={"min": 1})


@dataclass
class TrainConfig:
    """The training loop (``promptlab.engine.train``)."""

    epochs: int = field(default=200, metadata={"min": 0})  # 0 = no training (zero-shot evaluation only)
    epochs_by_shots: dict[int, int] = field(default_factory=dict)  # shots -> epochs; overrides `epochs`
    # > 0: the run lasts this many optimizer steps per shot (CLIP-LoRA: 500 x shots iterations), cut
    # inside an epoch if need be; the epochs become as many as those steps need
    steps_per_shot: int = field(default=0, metadata={"min": 0})
    batch_size: int = field(default=32, metadata={"min": 1})
    # warm-up epochs before the cosine schedule starts
    warmup_epochs: int = field(default=1, metadata={"min": 0})
    # constant warm-up lr (Dassl WARMUP_CONS_LR); start lr of linear warm-up
    warmup_lr: float = field(default=1.0e-5, metadata={"min": 0})
    warmup_type: Literal["constant", "linear"] = "constant"
    # dassl_cosine: one lr per epoch, cosine restarting at the lr after the warm-up (CoOp, Dassl forks);
    # timm_cosine: timm's CosineLRScheduler per iteration, warm-up then the cosine at the absolute
    # iteration down to min_lr_ratio x lr (ViFi-CLIP utils/optimizer.py)
    # constant: the lr after the warm-up throughout (AnomalyCLIP's train.py has no scheduler)
    # cosine: torch's CosineAnnealingLR per optimizer step over the run, no warm-up (Tip-Adapter-F, CLIP-LoRA)
    lr_schedule: Literal["dassl_cosine", "timm_cosine", "constant", "cosine"] = "dassl_cosine"
    min_lr_ratio: float = 0.0  # timm_cosine's floor lr_min as a fraction of the lr (ViFi-CLIP: 0.01)
    amp: Precision = "fp32"  # autocast dtype (bf16 / fp16); learned tensors and optimizer stay fp32
    grad_clip: float | None = None  # max global grad norm; null = no clipping
    # recompute text-tower activations in backward: less memory (ImageNet-size C)
    grad_checkpointing: bool = False
    # frozen image side: train on aug_views cached augmented views per image (a speed option, seeded by
    # the run seed); false = the references' protocol, a fresh crop + flip every epoch
    feature_cache: bool = True
    # augmented views per training image encoded once for the feature cache
    aug_views: int = field(default=10, metadata={"min": 1})
    checkpoint_every: int = field(default=1, metadata={"min": 1})  # epochs between checkpoints
    log_every: int = field(default=20, metadata={"min": 1})  # steps between TensorBoard scalars
    # > 0: profile that many training steps (after 2 warm-up steps) and log where time goes
    profile_steps: int = field(default=0, metadata={"min": 0})
    # optimizer step every N batches (effective batch = N x batch_size)
    grad_accum_steps: int = field(default=1, metadata={"min": 1})
    # drop each epoch's last, incomplete accumulation group instead of stepping on it (ViFi-CLIP
    # zeroes its gradient at the next epoch's start)
    drop_partial_accum: bool = False


@dataclass
class VideoConfig:
    """Clips of video datasets (``modality: video``; see ``promptlab.video``). Ignored for images."""

    # T frames per clip, one per temporal segment (ViFi-CLIP: 32)
    num_frames: int = field(default=8, metadata={"min": 1})
    # temporal views per test video (ViFi-CLIP multi-view test: 4)
    test_clips: int = field(default=1, metadata={"min": 1})
    # spatial views per test clip: 1 (centre) or 3 (ViFi-CLIP multi-view test)
    test_crops: int = field(default=1, metadata={"min": 1})
    normalize: Literal["clip", "imagenet"] = "clip"  # pixel mean/std; ViFi-CLIP normalises with ImageNet's
    # mixup Beta alpha on training batches; 0 = off (ViFi-CLIP: 0.8)
    mixup: float = field(default=0.0, metadata={"min": 0})
    cutmix: float = field(default=0.0, metadata={"min": 0})  # CutMix Beta alpha; 0 = off (ViFi-CLIP: 1.0)
    mix_switch_prob: float = 0.5  # probability of CutMix rather than mixup when both are on


@dataclass
class EvalConfig:
    """Evaluation of the last-epoch model (CoOp protocol: no model selection)."""

    batch_size: int = field(default=100, metadata={"min": 1})
    split: Literal["val", "test"] = "test"
    # autocast at evaluation; null: as train.amp. The Dassl-based references (CoOp family, MoCoOp)
    # evaluate without autocast even when they train with PREC=amp; ViFi-CLIP's apex O1 casts there too.
    amp: Precision | None = None


@dataclass
class LauncherConfig:
    """What ``promptlab sweep --launcher slurm`` asks Slurm for, per job (see ``promptlab.launchers``).

    Local runs ignore it, and a change here never makes a run directory "another configuration":
    resubmitting with more time or another partition resumes the same run.
    """

    partition: str | None = None  # sbatch --partition; null = the cluster's default
    time: int = field(default=60, metadata={"min": 1})  # minutes per job (sbatch --time)
    gpus_per_job: int = field(default=0, metadata={"min": 0})  # > 1: the run trains under torchrun
    cpus_per_job: int = field(default=1, metadata={"min": 1})  # sbatch --cpus-per-task
    mem: str | int | None = field(  # sbatch --mem: MB, or 32G; null = the cluster's default
        default=None, metadata={"pattern": (r"\d+[KMGT]?", "a size such as 16000, 32G or 1T")}
    )
    # any other sbatch option, name without dashes -> value (true for a bare flag): {account: x, qos: y}
    sbatch: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnomalyDataConfig:
    """One anomaly-detection dataset in a layout of ``promptlab.anomaly.data`` (images and pixel masks)."""

    root: str = field(metadata={"path": True})  # the dataset's folder; must exist (unless generated)
    layout: Literal["mvtec", "visa", "folder"] = "mvtec"
    split: str = "test"  # the auxiliary dataset's test split is the one with masks
    categories: list[str] | None = None  # null = every category found
    # procedural data only (the sandbox): {_component_: dotted.path, **kwargs}, called as
    # fn(root, **kwargs) to write the dataset at `root` on first use; it skips work when complete
    generator: dict[str, Any] | None = None


@dataclass
class AnomalyConfig:
    """The ``anomaly`` task (``task: anomaly``, AnomalyCLIP's zero-shot protocol): train the prompts on
    ``train_data``'s images and masks, evaluate per category on ``eval_data`` (objects never seen)."""

    train_data: AnomalyDataConfig
    eval_data: AnomalyDataConfig
    data_root: str = "data"  # a folder the two roots may interpolate (${anomaly.data_root}/visa)
    image_size: int = field(default=518, metadata={"min": 1})  # square input, positions interpolated
    sigma: float = field(default=4.0, metadata={"min": 0})  # Gaussian smoothing of the maps, pixels
    aupro: Literal["published", "fpr_limit"] = "published"  # see promptlab.metrics.aupro
    num_workers: int = field(default=0, metadata={"min": 0})  # DataLoader workers


#: The recipe's ``task``: which data, batches and evaluator a run uses (``promptlab.tasks``).
TASK_SECTIONS = {"classification": "data", "anomaly": "anomaly"}


@dataclass
class RecipeConfig:
    """A whole recipe (top level of the YAML file)."""

    output_dir: str  # run directory; usually interpolates ${data.name}, ${shots}, ${seed}
    model: ModelConfig
    # PromptModule subclass, built as Cls(clip, classnames, **hparams)
    method: dict[str, Any] = field(metadata={"component": ("clip", "classnames"), "kind": "method"})
    # classification: images or videos of a dataset YAML (the `data` section; video datasets read the
    # `video` section too); anomaly: pixel-level anomaly detection (the `anomaly` section)
    task: Literal["classification", "anomaly"] = "classification"
    data: DataConfig | None = None  # task: classification
    anomaly: AnomalyConfig | None = None  # task: anomaly
    seed: int = 1  # seeds python, numpy and torch; also the few-shot draw
    shots: int = 16  # K shots per class; <= 0 means all training data
    subsample: Literal["all", "base", "new"] = "all"  # base-to-new protocol: train on base, test both
    cache_dir: str = "~/.cache/promptlab"  # feature / few-shot caches (~ expanded at use)
    resume: bool = False  # continue an interrupted run found in output_dir
    device: str = field(  # where to run
        default="auto", metadata={"pattern": (r"auto|cpu|cuda|cuda:\d+", "auto, cpu, cuda or cuda:N")}
    )
    # torch optimizer, built as Cls(params, **kwargs); may be null when train.epochs == 0
    optimizer: dict[str, Any] | None = field(
        default=None, metadata={"component": ("params",), "kind": "optimizer"}
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # sweeps on Slurm (--launcher slurm)
    # dataset name -> recipe keys merged over this recipe when data.name is that dataset (the
    # references' per-dataset configs, e.g. CoOp's 50 ImageNet epochs); command-line overrides still
    # win. Applied (and then emptied) by load_recipe, so a run's config.yaml holds the merged values.
    per_dataset: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def _is_component(value: Any) -> bool:
    return isinstance(value, (Mapping, DictConfig)) and COMPONENT_KEY in value


def component_kwargs(node: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a ``_component_`` node as plain python containers (resolved).

    Nested component nodes stay as dicts (not built); useful to record a method's hyperparameters.
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in data.items() if k != COMPONENT_KEY}


def _resolve_nested(value: Any) -> None:
    """Check every nested component path first, so a refused one is found before any sibling is built."""
    if isinstance(value, Mapping):
        if COMPONENT_KEY in value:
            resolve_component(value[COMPONENT_KEY])
        for v in value.values():
            _resolve_nested(v)
    elif isinstance(value, list):
        for v in value:
            _resolve_nested(v)


def _build(value: Any) -> Any:
    """Recursively instantiate nested component nodes inside plain containers."""
    if isinstance(value, Mapping):
        if COMPONENT_KEY in value:
            return instantiate(value)
        return {k: _build(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v) for v in value]
    return value


def instantiate(
    node: DictConfig | Mapping[str, Any], *args: Any, kind: str | None = None, **kwargs: Any
) -> Any:
    """Build ``node[_component_](*args, **node_kwargs, **kwargs)``.

    ``args`` / ``kwargs`` are runtime arguments the recipe cannot hold (the CLIP model, class names,
    parameters); keyword ones override the recipe's. ``kind`` is the node's role
    (see :func:`resolve_component`). Nested ``_component_`` nodes among the recipe's kwargs are
    resolved, every one of them, before anything is called, then built (with no runtime arguments).
    """
    if not _is_component(node):
        raise ConfigError(f"instantiate needs a mapping with a {COMPONENT_KEY!r} key, got {node!r}")
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = resolve_component(data.pop(COMPONENT_KEY), kind)
    _resolve_nested(data)
    built = {k: _build(v) for k, v in data.items()}
    built.update(kwargs)
    return target(*args, **built)


# --------------------------------------------------------------------------------------------------
# Type checking of plain values against simple annotations
# --------------------------------------------------------------------------------------------------

_SEQ_ORIGINS = (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection)
_MAP_ORIGINS = (dict, cabc.Mapping, cabc.MutableMapping)
_UNCHECKED = object()  # sentinel: annotation too complex to check, accept any value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool | object:
    """True/False if ``value`` fits the annotation ``tp``; ``_UNCHECKED`` if ``tp`` is not simple."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if tp is None or tp is type(None):
        return value is None
    if tp is float:  # int is accepted for float (YAML writes 1 for 1.0); bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)  # True is not 1
    if origin in (Union, types.UnionType):
        results = [_matches(value, a) for a in args]
        if any(r is True for r in results):
            return True
        # Members we cannot check (Tensor, a class) cannot hold a YAML value: judge by the simple ones.
        return False if any(r is False for r in results) else _UNCHECKED
    if tp in (list, tuple) or origin in _SEQ_ORIGINS or tp in _SEQ_ORIGINS:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and ... not in args:  # tuple[int, str]: fixed length
            return len(value) == len(args) and all(_matches(v, a) is not False for v, a in zip(value, args))
        return all(_matches(v, args[0]) is not False for v in value) if args else True
    if tp in (dict,) or origin in _MAP_ORIGINS or tp in _MAP_ORIGINS:
        if not isinstance(value, Mapping):
            return False
        if len(args) != 2:
            return True
        return all(_key_matches(k, args[0]) and _matches(v, args[1]) is not False for k, v in value.items())
    return _UNCHECKED


def _key_matches(key: Any, tp: Any) -> bool:
    # `train.epochs_by_shots.4=100` on the command line makes the key a string: accept digit strings.
    if tp is int and isinstance(key, str):
        return bool(re.fullmatch(r"-?\d+", key))
    return _matches(key, tp) is not False


def _check_value(value: Any, tp: Any, key: str, source: str) -> None:
    if _matches(value, tp) is False:
        raise ConfigError(
            f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", key=key, source=source
        )


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    return did_you_mean(word, choices)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _plain(node: Any, key: str, source: str) -> Any:
    """Resolve a node to plain python, turning interpolation errors into ConfigErrors."""
    try:
        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
        return node
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"cannot resolve: {e}", key=getattr(e, "full_key", None) or key, source=source
        ) from e


def _get(cfg: DictConfig, name: str, key: str, source: str) -> Any:
    try:
        return cfg[name]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve: {_first_line(e)}", key=key, source=source) from e


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".tar"))


def _validate_section(
    cfg: Any, schema: type, prefix: str, source: str, check_paths: bool, check_components: bool = True
) -> None:
    """Check a plain section against a schema dataclass: keys, types, required fields, paths."""
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            f"expected a mapping ({schema.__name__}), got {type(cfg).__name__} {cfg!r}",
            key=prefix or None,
            source=source,
        )
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for name in cfg:
        if name not in fields:
            raise ConfigError(
                f"unknown key {name!r}{_did_you_mean(name, list(fields))}; "
                f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(fields)}",
                key=_join(prefix, name),
                source=source,
            )
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in cfg:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError("missing required key", key=key, source=source)
            continue
        tp = hints[name]
        value = _get(cfg, name, key, source)
        if "component" in f.metadata:
            if value is None and _matches(None, tp) is True:
                continue
            _validate_component(
                value, f.metadata["component"], key, source, f.metadata.get("kind"), check_components
            )
        elif (section := _section_schema(tp)) is not None:
            if value is None and section is not tp:  # an optional section left empty
                continue
            _validate_section(value, section, key, source, check_paths, check_components)
        else:
            value = _plain(value, key, source)
            _check_value(value, tp, key, source)
            low = f.metadata.get("min")
            if (
                low is not None
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value < low
            ):
                raise ConfigError(f"must be >= {low}, got {value!r}", key=key, source=source)
            if name == "epochs_by_shots" and isinstance(value, Mapping):
                for shots, n in value.items():
                    if isinstance(n, int) and n < 0:
                        raise ConfigError(f"must be >= 0, got {n!r}", key=f"{key}.{shots}", source=source)
            pattern, allowed = f.metadata.get("pattern", (None, None))
            if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
                raise ConfigError(f"expected {allowed}, got {value!r}", key=key, source=source)
            if check_paths and f.metadata.get("path") and isinstance(value, str):
                if not _is_generated(schema, cfg):
                    _check_exists(value, key, source)


def _section_schema(tp: Any) -> type | None:
    """The dataclass of a section annotated ``Section`` or ``Section | None``; None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    is_optional = typing.get_origin(tp) in (Union, types.UnionType) and len(inner) == 1
    return inner[0] if is_optional and dataclasses.is_dataclass(inner[0]) else None


def _is_generated(schema: type, cfg: DictConfig) -> bool:
    """Data written on first use: its root need not exist when the recipe is checked."""
    if schema is DataConfig:
        return _names_a_generator(cfg.get("name"))
    return schema is AnomalyDataConfig and cfg.get("generator") is not None


def _names_a_generator(name: str | None) -> bool:
    """The dataset's YAML names a ``generator:`` (the sandbox's, the synthetic demo's, a user's own), so its
    data are written under data.root on first use; an unknown name is left to the dataset checks."""
    from promptlab.data.registry import UnknownDataset, get_spec  # the data package imports this module

    try:
        return bool(name) and bool(get_spec(name).generator)
    except (UnknownDataset, FileNotFoundError):
        return False


def _check_exists(value: str, key: str, source: str) -> None:
    if not Path(value).expanduser().exists():
        raise ConfigError(f"path does not exist: {value}", key=key, source=source)


def _signature(target: Callable[..., Any], key: str, source: str) -> tuple[inspect.Signature, dict[str, Any]]:
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot read the signature of {target!r}: {e}", key=key, source=source) from e
    try:  # annotations may be strings (from __future__ import annotations)
        fn = target.__init__ if inspect.isclass(target) else target
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations are simply not type-checked
        hints = {}
    return sig, hints


def _validate_component(
    node: Any,
    runtime_args: Sequence[str],
    key: str,
    source: str,
    kind: str | None = None,
    check_signature: bool = True,
) -> None:
    """Check a ``_component_`` node: the target is allowed for ``kind`` and imports, and every key is a
    valid keyword argument. Nested nodes may build classes only (see :mod:`promptlab.trust`).

    With ``check_signature=False`` nothing is imported: the path must be well formed and trusted for
    its role (checked by name), and nested nodes likewise; the arguments are not checked.
    """
    if not _is_component(node):
        raise ConfigError(
            f"expected a mapping with a {COMPONENT_KEY!r} key (dotted path of a callable), got {node!r}",
            key=key,
            source=source,
        )
    dotted = _plain(node[COMPONENT_KEY], _join(key, COMPONENT_KEY), source)
    if not check_signature:
        _check_component_path(dotted, kind, _join(key, COMPONENT_KEY), source)
        for name in node:
            value = _get(node, name, _join(key, name), source)
            if name != COMPONENT_KEY and _is_component(value):
                _validate_component(value, (), _join(key, name), source, None, False)
        return
    try:
        target = resolve_component(dotted, kind)
    except ConfigError as e:
        raise ConfigError(e.reason, key=_join(key, COMPONENT_KEY), source=source) from e
    sig, hints = _signature(target, key, source)
    params = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in runtime_args
    }
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for name in node:
        if name == COMPONENT_KEY:
            continue
        sub = _join(key, name)
        if name in runtime_args:
            raise ConfigError(
                f"{name!r} is passed at run time and cannot be set in a recipe", key=sub, source=source
            )
        if name not in params and not var_kw:
            raise ConfigError(
                f"unknown argument {name!r} of {dotted}{_did_you_mean(name, list(params))}; "
                f"valid arguments: {', '.join(params) or '(none)'}",
                key=sub,
                source=source,
            )
        value = _get(node, name, sub, source)
        if _is_component(value):  # nested component: validated on its own, built before the call
            _validate_component(value, (), sub, source)
            continue
        value = _plain(value, sub, source)
        if name in params:
            _check_value(value, hints.get(name, params[name].annotation), sub, source)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in node]
    if missing:
        raise ConfigError(
            f"missing required argument(s) of {dotted}: {', '.join(missing)}", key=key, source=source
        )


def validate_recipe(
    cfg: DictConfig, source: str = "<recipe>", *, check_paths: bool = True, check_components: bool = True
) -> None:
    """Validate a recipe against :class:`RecipeConfig` and its components' signatures.

    Args:
        cfg: the recipe (resolved or not; interpolations are resolved while checking).
        source: the recipe file, named in every error.
        check_paths: require ``data.root`` and a path-like ``model.pretrained`` to exist. Off for
            recipe tests on machines without data.
        check_components: import each ``_component_`` to check its arguments, and check
            ``model.arch``. Both need torch (seconds to import), so ``sweep --dry-run`` turns this
            off to list a plan at once; the sweep itself checks everything before any job starts.

    Raises:
        ConfigError: the first problem found, naming ``source`` and the key path.
    """
    _validate_section(cfg, RecipeConfig, "", source, check_paths, check_components)
    _check_task_section(cfg, source)
    amp = (cfg.get("train") or {}).get("amp", "fp32")
    if cfg.model.get("precision") == "reference_fp16" and amp != "fp32":
        raise ConfigError(
            "model.precision=reference_fp16 is pure fp16 arithmetic: it runs without autocast (train.amp=fp32)",
            key="train.amp",
            source=source,
        )
    pretrained = (
        _get(cfg.model, "pretrained", "model.pretrained", source) if "pretrained" in cfg.model else None
    )
    if check_paths and isinstance(pretrained, str) and _looks_like_path(pretrained):
        _check_exists(pretrained, "model.pretrained", source)
    if check_components:
        _check_backbone(cfg, source)


def _check_task_section(cfg: DictConfig, source: str) -> None:
    """The recipe has its task's section (``data`` / ``anomaly``) and no other task's."""
    task = _plain(_get(cfg, "task", "task", source), "task", source) if "task" in cfg else "classification"
    for other, section in TASK_SECTIONS.items():
        present = cfg.get(section) is not None
        if other == task and not present:
            raise ConfigError(f"task {task!r} needs the {section!r} section", key=section, source=source)
        if other != task and present:
            raise ConfigError(
                f"the {section!r} section belongs to task {other!r}, and this recipe's task is {task!r}",
                key=section,
                source=source,
            )


def _check_component_path(dotted: Any, kind: str | None, key: str, source: str) -> None:
    """The import-free half of :func:`resolve_component`: well formed and trusted for ``kind``."""
    try:
        check_component_path(dotted, kind)
    except ConfigError as e:
        raise ConfigError(e.reason, key=key, source=source) from None


def _check_backbone(cfg: DictConfig, source: str) -> None:
    """``model.arch`` and an open_clip tag in ``model.pretrained`` exist, before any data or model is loaded.

    ``data.name`` is looked up by the first step that reads data (``runner.ensure_data``, ``plan_sweep``),
    still before anything is generated or trained.
    """
    from promptlab.backbones import UnknownBackbone, check_backbone

    arch = _get(cfg.model, "arch", "model.arch", source)
    pretrained = (
        _get(cfg.model, "pretrained", "model.pretrained", source) if "pretrained" in cfg.model else None
    )
    try:
        check_backbone(str(arch), None if pretrained is None else str(pretrained))
    except UnknownBackbone as e:
        raise ConfigError(e.reason, key=e.key, source=source) from None


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------


def _schema_type(path: Sequence[Any]) -> Any:
    """The schema annotation at a key path (None if the path is not in the schema)."""
    tp: Any = RecipeConfig
    for part in path:
        tp = _section_schema(tp)
        if tp is None:
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


_NO_DEFAULT = object()


def schema_default(path: Sequence[Any]) -> Any:
    """The schema's default at a key path (``train.steps_per_shot`` -> 0), or ``_NO_DEFAULT``.

    A run directory written before a key joined the schema lacks it; its run is the one the default
    describes (the key was added at the behaviour it had before).
    """
    tp: Any = RecipeConfig
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            return _NO_DEFAULT
        field = {f.name: f for f in dataclasses.fields(tp)}.get(part)
        if field is None:
            return _NO_DEFAULT
        if i == len(path) - 1:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            return _NO_DEFAULT
        tp = typing.get_type_hints(tp)[part]
    return _NO_DEFAULT


def _is_open_map(node: DictConfig, path: Sequence[Any]) -> bool:
    """May an override add a new key here? Yes in component nodes and free-form maps (epochs_by_shots)."""
    if COMPONENT_KEY in node:
        return True
    tp = _schema_type(path)
    return tp is not None and (typing.get_origin(tp) in _MAP_ORIGINS or tp is dict)


def _parse_override(item: str, source: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value", source=source)
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[\w-]+(\.[\w-]+)*", key):
        raise ConfigError(f"bad key in override {item!r}", key=key or None, source=source)
    # YAML-parse the value the way OmegaConf does (ints, floats, null, lists); keep ${...} unresolved.
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"_v={raw}"]), resolve=False)["_v"]
    except Exception as e:  # YAML and OmegaConf parse errors
        raise ConfigError(f"cannot parse value {raw!r}: {_first_line(e)}", key=key, source=source) from e
    return key.split("."), value


def _apply_override(cfg: DictConfig, parts: list[str], value: Any, source: str) -> None:
    node: Any = cfg
    path: list[Any] = []
    for i, part in enumerate(parts):
        key: Any = part
        if isinstance(node, DictConfig) and key not in node and re.fullmatch(r"-?\d+", part):
            tp = _schema_type(path)  # int-keyed maps (epochs_by_shots): `...epochs_by_shots.4=100`
            if int(part) in node or (tp is not None and typing.get_args(tp)[:1] == (int,)):
                key = int(part)
        full = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, ListConfig) and re.fullmatch(r"\d+", part) and int(part) < len(node):
            key = int(part)
        elif not isinstance(node, DictConfig):
            raise ConfigError(f"cannot set a key inside a {type(node).__name__}", key=full, source=source)
        elif key not in node and not (last and _is_open_map(node, path)):
            level = ".".join(parts[:i]) or "the top level"
            valid = [str(k) for k in node]
            raise ConfigError(
                f"override of unknown key {part!r}{_did_you_mean(part, valid)}; "
                f"valid keys at {level}: {', '.join(valid)}",
                key=full,
                source=source,
            )
        if last:
            node[key] = value
        else:
            node = node[key]
            path.append(key)


def _fill_defaults(cfg: DictConfig, schema: type) -> None:
    """Add the schema's defaults for keys a recipe left out, so the engine can read every field."""
    for f in dataclasses.fields(schema):
        tp = typing.get_type_hints(schema)[f.name]
        if f.name not in cfg:
            if f.default is not dataclasses.MISSING:
                cfg[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                cfg[f.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        elif _section_schema(tp) is not None and isinstance(cfg[f.name], DictConfig):
            _fill_defaults(cfg[f.name], _section_schema(tp))


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    check_components: bool = True,
) -> DictConfig:
    """Load a recipe, apply ``key=value`` overrides, validate it and resolve interpolations.

    Args:
        path: the recipe YAML file.
        overrides: dotlist items such as ``"shots=4"``, ``"data.root=/x"``, ``"method.csc=true"``.
            Only existing keys may be overridden, except inside ``_component_`` nodes (any argument
            of the target) and free-form maps such as ``train.epochs_by_shots``.
        check_paths, check_components: see :func:`validate_recipe`.

    Returns:
        The validated, resolved config, with schema defaults filled in for omitted optional keys.

    Raises:
        ConfigError: naming the recipe file and the offending key path.
    """
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError("recipe file not found", source=source)
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in several types
        raise ConfigError(f"cannot parse YAML: {e}", source=source) from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"a recipe must be a mapping, got {type(cfg).__name__}", source=source)
    check_interpolations(cfg, source)  # the file's own; command-line overrides are the user's
    _fill_defaults(cfg, RecipeConfig)  # first, so optional keys a recipe leaves out can be overridden too
    parsed = [_parse_override(item, source) for item in overrides]
    for parts, value in parsed:
        _apply_override(cfg, parts, value, source)
    _fill_defaults(cfg, RecipeConfig)  # again, for sections an override replaced wholesale
    cfg = _apply_per_dataset(cfg, parsed, source, check_paths, check_components)
    validate_recipe(cfg, source, check_paths=check_paths, check_components=check_components)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"cannot resolve: {_first_line(e)}", key=getattr(e, "full_key", None), source=source
        ) from e
    return cfg


_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")
_ALLOWED_ENV = re.compile(r"\s*(PROMPTLAB_\w+|DATA)\s*[,}]")  # DATA: the datasets root, as in CoOp's scripts


def check_interpolations(cfg: DictConfig | ListConfig, source: str) -> None:
    """Refuse resolver calls in a shared file, but ``${oc.env:PROMPTLAB_...}`` and ``${oc.env:DATA}``.

    ``${a.b}`` reads another key of the same file: harmless. A resolver runs when the file is
    resolved, and ``${oc.env:NAME}`` copies any environment variable (a cloud key, a token) into
    the resolved ``config.yaml`` that run folders share. A recipe may read promptlab's own variables
    (``PROMPTLAB_CACHE``) and the datasets root ``DATA``; anything else is given on the command line,
    where the user sees it.

    Raises:
        ConfigError: naming the key and the resolver or variable.
    """

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(str(k), _join(key, str(k)))
                walk(v, _join(key, str(k)))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, _join(key, str(i)))
        elif isinstance(node, str):
            for m in _RESOLVER_CALL.finditer(node):
                name, rest = m.group(1), node[m.end() :]
                if name != "oc.env":
                    raise ConfigError(
                        f"resolver ${{{name}:...}} is not allowed in a recipe (only ${{other.key}} and "
                        "${oc.env:PROMPTLAB_...} or ${oc.env:DATA}); give the value on the command line instead",
                        key=key or None,
                        source=source,
                    )
                if not _ALLOWED_ENV.match(rest):
                    raise ConfigError(
                        f"{node!r} reads an environment variable; a recipe may read only PROMPTLAB_* "
                        "variables and DATA (it would copy any other, e.g. a token, into the run's config.yaml); "
                        "give the value on the command line instead",
                        key=key or None,
                        source=source,
                    )

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def _apply_per_dataset(
    cfg: DictConfig,
    parsed: Sequence[tuple[list[str], Any]],
    source: str,
    check_paths: bool,
    check_components: bool = True,
) -> DictConfig:
    """Merge ``per_dataset[<data.name>]`` over the recipe, then the command-line overrides again.

    Every block is checked now, whichever dataset runs: its name must be a known dataset and the
    recipe with the block merged must validate, so a typo fails at load time naming
    ``per_dataset.<name>``.
    """
    from promptlab.data import get_spec  # lazy: the data layer is not needed to read a recipe

    blocks = _get(cfg, "per_dataset", "per_dataset", source)
    if not blocks:
        return cfg
    if not isinstance(blocks, DictConfig):
        raise ConfigError(
            f"expected a mapping of dataset name -> recipe keys, got {blocks!r}", "per_dataset", source
        )
    selected = None
    name = _plain(_get(cfg.data, "name", "data.name", source), "data.name", source)
    own = _spec_name(name, get_spec)
    for ds in blocks:
        key = f"per_dataset.{ds}"
        try:
            get_spec(str(ds))
        except KeyError as e:
            raise ConfigError(str(e), key=key, source=source) from e
        block = blocks[ds]
        if not isinstance(block, DictConfig):
            raise ConfigError(f"expected a mapping of recipe keys, got {block!r}", key=key, source=source)
        if "per_dataset" in block or "name" in (block.get("data") or {}):
            raise ConfigError(
                "a per-dataset block cannot set per_dataset or data.name", key=key, source=source
            )
        merged = OmegaConf.merge(cfg, block)
        merged.per_dataset = {}
        try:
            validate_recipe(merged, source, check_paths=False, check_components=check_components)
        except ConfigError as e:
            raise ConfigError(e.reason, key=_join(key, e.key) if e.key else key, source=source) from e
        if ds == name or ds == own:
            selected = merged
    if selected is None:
        cfg.per_dataset = {}
        return cfg
    for parts, value in parsed:  # the command line wins over the recipe's per-dataset values
        _apply_override(selected, parts, value, source)
    return selected


def _spec_name(name: Any, get_spec: Callable[[str], Any]) -> str | None:
    """The dataset's own name for ``data.name`` (which may be a YAML path); None if unknown."""
    try:
        return get_spec(str(name)).name
    except (KeyError, OSError, ValueError):
        return None


def eval_amp(cfg: DictConfig) -> str:
    """Autocast dtype of a run's evaluations (its own and ``promptlab eval``'s): ``eval.amp``, else
    ``train.amp``, so that a run's Base accuracy and a later New-class evaluation use one arithmetic."""
    amp = (cfg.get("eval") or {}).get("amp")
    return str(amp if amp is not None else (cfg.get("train") or {}).get("amp", "fp32"))


def epochs_for(cfg: DictConfig) -> int:
    """Training epochs for this run: ``train.epochs_by_shots[shots]`` if present, else ``train.epochs``.

    CoOp trains longer with more shots (1 -> 50, 2/4 -> 100, 8/16 -> 200 epochs); one recipe holds the
    whole table so a ``shots=`` override picks the right schedule.
    """
    by_shots = cfg.train.get("epochs_by_shots") or {}
    for key in (int(cfg.shots), str(cfg.shots)):
        if key in by_shots:
            return int(by_shots[key])
    return int(cfg.train.epochs)
