"""Reading the checkpoints Dassl's ``save_checkpoint`` writes, without running anything in them.

Every Dassl-based reference (CoOp, CoCoOp, KgCoOp, MaPLe, IVLP) saves one ``torch.save`` zip per model
name: ``{"state_dict", "epoch", "optimizer", "scheduler"[, "val_result"]}``
(KaiyangZhou/Dassl.pytorch ``dassl/engine/trainer.py`` save_model, ``dassl/utils/torchtools.py``
save_checkpoint). With the configs' constant warm-up (``WARMUP_EPOCH: 1``), the scheduler entry is
``ConstantWarmupScheduler.state_dict()``, i.e. its ``__dict__``, whose ``successor`` is a whole pickled
``CosineAnnealingLR`` *object* holding the whole ``SGD`` *object* (``Optimizer.__getstate__``: defaults,
a ``defaultdict(dict)`` state keyed by the parameters, param_groups holding the parameters). Written
by torch and Dassl as they are, the pickle names exactly these globals (checked by running Dassl's own
``build_optimizer`` / ``build_lr_scheduler`` / ``save_checkpoint``)::

    collections OrderedDict, collections defaultdict, __builtin__ dict,
    torch._utils _rebuild_tensor_v2, torch._utils _rebuild_parameter, torch HalfStorage / FloatStorage,
    torch.optim.sgd SGD, torch.optim.lr_scheduler CosineAnnealingLR

``torch.load(weights_only=True)`` refuses ``defaultdict`` and ``builtins.dict``; a full unpickle would run
whatever the file names. :func:`read_dassl_checkpoint` instead unpickles with an allow-list of exactly
what Dassl writes (plus the other optimizers and schedulers Dassl can build), each resolved to an inert
stand-in: optimizers and schedulers become :class:`PickledObject` records, tensors become
:class:`LazyTensor` records whose bytes are read only when :meth:`DasslCheckpoint.tensor` asks for them.
Any other global (``os.system``, ``builtins.eval``, a class of the author's code) is refused before
anything is built, with the file and the name in the error. Nothing in the file is ever called.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DasslCheckpoint", "LazyTensor", "PickledObject", "UnsafeCheckpointError", "read_dassl_checkpoint"]


class UnsafeCheckpointError(ValueError):
    """The checkpoint names something a Dassl checkpoint does not contain; it was not loaded."""


# ---------------------------------------------------------------------- inert stand-ins
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.HalfStorage`` etc. resolve to: a dtype, not a callable."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str  # the zip record data/<key>
    dtype: torch.dtype
    numel: int


@dataclass(eq=False)
class LazyTensor:
    """A tensor of the checkpoint, not read yet: its storage record and its view of it."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.size)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype


class PickledObject:
    """Inert record of a pickled optimizer or scheduler object: its class name and its state, never run."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname} (not loaded)>"


class _DictFactoryMarker:
    """``builtins.dict`` as the default factory of the optimizer's ``defaultdict(dict)``; not callable."""

    def __repr__(self) -> str:
        return "builtins.dict"


_DICT_FACTORY = _DictFactoryMarker()


def _defaultdict(factory: Any = None) -> dict:
    """``collections.defaultdict(dict)`` read back as a plain dict: the only default factory Dassl writes."""
    if factory is not _DICT_FACTORY:
        raise UnsafeCheckpointError(f"defaultdict with default factory {factory!r}; only dict is accepted")
    return {}


def _check_ints(*values: Any) -> None:
    for v in values:
        if not (isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(i, int) for i in v))):
            raise UnsafeCheckpointError(f"tensor layout {v!r} is not made of integers")


def _rebuild_tensor_v2(
    storage: Any,
    offset: int,
    size: tuple,
    stride: tuple,
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(
            f"a tensor rebuilt from {type(storage).__name__}, not from a storage record"
        )
    _check_ints(offset, size, stride)
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise UnsafeCheckpointError(f"negative tensor layout: offset {offset}, size {size}, stride {stride}")
    if len(size) != len(stride):
        raise UnsafeCheckpointError(f"tensor size {size} and stride {stride} differ in length")
    return LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(
    data: Any, requires_grad: bool = True, backward_hooks: Any = None, state: Any = None
) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is its tensor."""
    if not isinstance(data, LazyTensor):
        raise UnsafeCheckpointError(f"a parameter rebuilt from {type(data).__name__}, not from a tensor")
    return data


def _inert(module: str, name: str) -> type[PickledObject]:
    return type(name, (PickledObject,), {"__module__": module, "qualname": f"{module}.{name}"})


# Everything a Dassl checkpoint may name. Optimizers: dassl/optim/optimizer.py AVAI_OPTIMS (amsgrad is
# Adam); schedulers: dassl/optim/lr_scheduler.py build_lr_scheduler (a warm-up scheduler pickles its
# successor, one of torch's three).
_OBJECTS = [
    ("torch.optim.sgd", "SGD"),
    ("torch.optim.adam", "Adam"),
    ("torch.optim.adamw", "AdamW"),
    ("torch.optim.rmsprop", "RMSprop"),
    ("dassl.optim.radam", "RAdam"),
    ("torch.optim.lr_scheduler", "CosineAnnealingLR"),
    ("torch.optim.lr_scheduler", "StepLR"),
    ("torch.optim.lr_scheduler", "MultiStepLR"),
    ("dassl.optim.lr_scheduler", "ConstantWarmupScheduler"),
    ("dassl.optim.lr_scheduler", "LinearWarmupScheduler"),
]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,  # MultiStepLR's milestones
    ("collections", "defaultdict"): _defaultdict,
    ("builtins", "dict"): _DICT_FACTORY,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{(m, n): _inert(m, n) for m, n in _OBJECTS},
}
# torch.save pickles with protocol 2, which spells builtins the Python 2 way
_MODULE_ALIASES = {"__builtin__": "builtins"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Every global goes through :meth:`find_class`; only :data:`_ALLOWED` names resolve."""

    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (_MODULE_ALIASES.get(module, module), name)
        if key not in _ALLOWED:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to load: the pickle names {key[0]}.{key[1]}, which is not part of a "
                "Dassl checkpoint (promptlab reads only tensors, containers and optimizer/scheduler state, and "
                "never runs code from a checkpoint)"
            )
        return _ALLOWED[key]

    def persistent_load(self, pid: Any) -> _Storage:
        # torch's zip format: ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.source}: unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeCheckpointError(f"{self.source}: malformed storage record {pid!r}")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, stype.dtype, numel)
        return storage


class DasslCheckpoint:
    """One Dassl checkpoint file: its unpickled dict (tensors as :class:`LazyTensor`) and lazy tensor reads."""

    def __init__(self, path: Path, content: Any, prefix: str):
        self.path = path
        self.content = content
        self._prefix = prefix

    @property
    def state_dict(self) -> dict[str, Any]:
        """``content["state_dict"]``: the model's parameters and buffers, all as :class:`LazyTensor`."""
        sd = self.content.get("state_dict") if isinstance(self.content, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"{self.path}: not a Dassl checkpoint (no 'state_dict' dict in it)")
        return sd

    @property
    def epoch(self) -> Any:
        return self.content.get("epoch") if isinstance(self.content, dict) else None

    def tensor(self, key: str) -> torch.Tensor:
        """Read one ``state_dict`` entry from the file (a copy in its saved dtype, on the CPU)."""
        value = self.state_dict.get(key)
        if not isinstance(value, LazyTensor):
            raise KeyError(f"{self.path}: no tensor {key!r} in the state dict")
        s = value.storage
        itemsize = torch.empty((), dtype=s.dtype).element_size()
        n_view = 1
        for n in value.size:
            n_view *= n
        extent = value.offset + sum((n - 1) * st for n, st in zip(value.size, value.stride) if n > 0)
        if n_view and (extent >= s.numel or n_view > s.numel):
            raise ValueError(f"{self.path}: {key!r} {list(value.size)} does not fit its storage of {s.numel}")
        name = f"{self._prefix}data/{s.key}"
        with zipfile.ZipFile(self.path) as z:
            try:
                info = z.getinfo(name)
            except KeyError:
                raise ValueError(
                    f"{self.path}: storage {s.key} of {key!r} is missing from the archive"
                ) from None
            if info.file_size != s.numel * itemsize:  # checked before reading: no unbounded allocation
                raise ValueError(
                    f"{self.path}: storage of {key!r} holds {info.file_size} bytes, expected {s.numel * itemsize}"
                )
            raw = z.read(info)
        flat = torch.frombuffer(bytearray(raw), dtype=s.dtype) if raw else torch.empty(0, dtype=s.dtype)
        return flat.as_strided(value.size, value.stride, value.offset).clone()


def read_dassl_checkpoint(path: str | Path) -> DasslCheckpoint:
    """Unpickle a Dassl checkpoint with the allow-list; read no tensor data yet.

    Raises:
        UnsafeCheckpointError: the pickle names anything but what Dassl writes (the file and the name
            are in the message); nothing from the file was run.
        ValueError: not a torch zip checkpoint (e.g. torch < 1.6's legacy format), or damaged.
    """
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(
            f"{path}: not a torch zip checkpoint (the legacy format of torch < 1.6 cannot be checked before "
            "unpickling, and promptlab never unpickles a checkpoint in full; re-save it with torch.save in an "
            "environment you trust)"
        ) from None
    with z:
        pkls = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl record, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        names = set(z.namelist())
        if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder").strip() != b"little":
            raise ValueError(f"{path}: written on a big-endian machine; not supported")
        with z.open(pkls[0]) as f:
            unpickler = _RestrictedUnpickler(f, str(path))
            try:
                content = unpickler.load()
            except UnsafeCheckpointError as e:
                if str(path) in str(e):
                    raise
                raise UnsafeCheckpointError(f"{path}: refusing to load: {e}") from e
            except Exception as e:  # a malformed stream, a stand-in called the wrong way, ...
                raise UnsafeCheckpointError(
                    f"{path}: cannot read this checkpoint safely ({type(e).__name__}: {e})"
                ) from e
    return DasslCheckpoint(path, content, prefix)
