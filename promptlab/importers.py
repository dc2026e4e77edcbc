"""Importing trained prompts from the Dassl-based reference repositories.

Each reference trains with Dassl and saves ``<run>/<model name>/model.pth.tar-<epoch>`` (plus
``checkpoint``, naming the last one, and ``model-best.pth.tar``). What the state dict holds, per
reference (``load_model`` of each trainer drops the class-name buffers ``token_prefix`` /
``token_suffix``; promptlab rebuilds them from the class names, so the prompts can serve other classes):

======  =========================  ============================================================
source  model name (directory)     learned tensors read
======  =========================  ============================================================
coop    prompt_learner             ``ctx`` [n, W] or class-specific [C, n, W] (KaiyangZhou/CoOp)
cocoop  prompt_learner             ``ctx``, ``meta_net.linear1/2.{weight,bias}`` (KaiyangZhou/CoOp)
kgcoop  prompt_learner             ``ctx`` (htyao89/KgCoOp; its ``bias_vectors`` and ``meta_net`` are
                                   never used by its forward and are skipped)
maple   MultiModalPromptLearner    the whole CustomCLIP: ``prompt_learner.{ctx, proj,
                                   compound_prompts_text.j, compound_prompt_projections.j}``
                                   (muzairkhattak/multimodal-prompt-learning)
ivlp    VLPromptLearner            the whole CustomCLIP: ``prompt_learner.ctx``, ``image_encoder.VPT``,
                                   ``{image,text}_encoder.transformer.resblocks.i.VPT_shallow``
======  =========================  ============================================================

``promptsrc`` (muzairkhattak/PromptSRC, model name ``VLPromptLearner``) is read as ``ivlp``: the same
prompted model; its file holds the GPA-averaged prompts, plus a frozen CLIP (and a zero-shot copy)
whose fp16 weights GPA rounded, which are not read.

Only those tensors are read from the file (MaPLe and IVLP checkpoints also hold the whole CLIP). The
files are unpickled by :mod:`promptlab.dassl_checkpoint`, which runs nothing in them.

Precision: promptlab computes in fp32 with the checkpoint's values. The multimodal references cast
every deep / vision prompt to fp16 where it enters a tower (``clip/model.py`` ``.half()``), in fp32
runs too: IVLP's prompts are therefore rounded to fp16 on import (the values its forward uses);
MaPLe's vision prompts are outputs of its coupling maps, so its import differs from the reference by
that rounding (~5e-5 in the logits of the tests' tiny model).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptlab.clip import FrozenCLIP
from promptlab.dassl_checkpoint import DasslCheckpoint, LazyTensor, read_dassl_checkpoint
from promptlab.methods import METHODS
from promptlab.prompts import PromptModule

log = logging.getLogger(__name__)

__all__ = ["SOURCES", "find_checkpoint", "import_checkpoint"]

_EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
_BEST_FILE = "model-best.pth.tar"
# MaPLe / IVLP fall back to random context behind "X X .." when n_ctx > 4, whatever CTX_INIT says
# (trainers/maple.py MultiModalPromptLearner.__init__, trainers/independentVL.py VLPromptLearner.__init__).
_MAX_INIT_CTX = 4

Converted = tuple[dict[str, Any], dict[str, torch.Tensor]]  # (method hparams, prompt state dict)


@dataclass(frozen=True)
class _Source:
    method: str  # the promptlab METHODS key
    model_name: str  # Dassl's register_model name: the run's sub-directory
    convert: Callable[[DasslCheckpoint, FrozenCLIP, dict[str, Any]], Converted]


# ---------------------------------------------------------------------- finding the file
def find_checkpoint(
    path: str | Path, model_name: str = "prompt_learner", epoch: int | str | None = None
) -> Path:
    """The checkpoint file of a Dassl run directory, of its model directory, or the file itself.

    Args:
        path: ``model.pth.tar-N`` / ``model-best.pth.tar``, the model directory holding them, or the run
            directory holding ``<model_name>/``.
        model_name: the trainer's model name (``prompt_learner``, ``MultiModalPromptLearner``, ...).
        epoch: ``None``: the file Dassl's ``checkpoint`` pointer names (the last saved), else the highest
            epoch, else ``model-best.pth.tar``; an int: ``model.pth.tar-<epoch>``; ``"best"``: the best one.
            The reference protocol evaluates the last epoch.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    for d in (path, path / model_name):
        if not d.is_dir():
            continue
        epochs = {int(m.group(1)): p for p in d.iterdir() if (m := _EPOCH_FILE.match(p.name)) and p.is_file()}
        best = d / _BEST_FILE
        if not epochs and not best.is_file():
            continue
        if epoch == "best" or (epoch is None and not epochs):
            if best.is_file():
                return best
            raise FileNotFoundError(f"{d}: no {_BEST_FILE} (epochs saved: {sorted(epochs)})")
        if epoch is not None:
            if int(epoch) in epochs:
                return epochs[int(epoch)]
            raise FileNotFoundError(f"{d}: no model.pth.tar-{epoch} (epochs saved: {sorted(epochs)})")
        pointer = d / "checkpoint"  # torchtools.save_checkpoint writes the last file's name there
        if pointer.is_file():
            named = pointer.read_text(encoding="utf-8", errors="replace").strip()
            if _EPOCH_FILE.match(named) and (d / named).is_file():
                return d / named
        return epochs[max(epochs)]
    raise FileNotFoundError(
        f"{path}: no Dassl checkpoint ({model_name}/model.pth.tar-N or {_BEST_FILE}) in it or in "
        f"{path / model_name}"
    )


# ---------------------------------------------------------------------- reading tensors
def _read(ck: DasslCheckpoint, key: str, dims: tuple[int, ...], what: str = "") -> torch.Tensor:
    """One state-dict tensor as fp32, with its number of dimensions checked."""
    if key not in ck.state_dict:
        raise ValueError(
            f"{ck.path}: no {key!r} in the state dict{what}; its keys: {_key_summary(ck.state_dict)}"
        )
    t = ck.tensor(key)
    if t.dim() not in dims:
        raise ValueError(
            f"{ck.path}: {key!r} has shape {list(t.shape)}, expected {' or '.join(f'{d}-D' for d in dims)}"
        )
    return t.float()  # the references keep learned tensors in fp16 (PREC fp16) or fp32


def _key_summary(sd: dict[str, Any], limit: int = 12) -> str:
    keys = sorted(k for k, v in sd.items() if isinstance(v, LazyTensor))
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _indexed(ck: DasslCheckpoint, pattern: str, start: int) -> list[str]:
    """Keys matching ``pattern`` (one ``{}`` for an index), in index order; the indices must run start, start + 1, ..."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted((int(m.group(1)), k) for k in ck.state_dict if (m := rx.match(k)))
    idx = [i for i, _ in found]
    if idx != list(range(start, start + len(idx))):
        raise ValueError(f"{ck.path}: {pattern.format('j')} at j = {idx}; expected {start}, {start + 1}, ...")
    return [k for _, k in found]


def _context(ck: DasslCheckpoint, key: str, clip: FrozenCLIP, dims: tuple[int, ...] = (2,)) -> torch.Tensor:
    ctx = _read(ck, key, dims)
    if ctx.shape[-1] != clip.width:
        raise ValueError(
            f"{ck.path}: context vectors have width {ctx.shape[-1]} but the text tower of {clip.arch} has width "
            f"{clip.width}; load the backbone the prompts were learned on"
        )
    return ctx


def _words(ctx_init: Any, n_ctx: int) -> str | None:
    return ctx_init if ctx_init and n_ctx <= _MAX_INIT_CTX else None


# ---------------------------------------------------------------------- per reference
def _coop(ck: DasslCheckpoint, clip: FrozenCLIP, hp: dict[str, Any]) -> Converted:
    ctx = _context(ck, "ctx", clip, (2, 3))  # [n, W] or class-specific [C, n, W]
    # CoOp ignores CSC when CTX_INIT gives words (trainers/coop.py PromptLearner): the shape decides.
    return {**hp, "n_ctx": ctx.shape[-2], "ctx_init": None, "csc": ctx.dim() == 3}, {"ctx": ctx}


def _cocoop(ck: DasslCheckpoint, clip: FrozenCLIP, hp: dict[str, Any]) -> Converted:
    state = {"ctx": _context(ck, "ctx", clip)}
    for layer in ("linear1", "linear2"):  # trainers/cocoop.py: meta_net = linear1 -> ReLU -> linear2
        state[f"meta_net.{layer}.weight"] = _read(
            ck, f"meta_net.{layer}.weight", (2,), " (CoCoOp's meta-net)"
        )
        state[f"meta_net.{layer}.bias"] = _read(ck, f"meta_net.{layer}.bias", (1,), " (CoCoOp's meta-net)")
    return {**hp, "n_ctx": state["ctx"].shape[0], "ctx_init": None}, state


def _kgcoop(ck: DasslCheckpoint, clip: FrozenCLIP, hp: dict[str, Any]) -> Converted:
    ctx = _context(ck, "ctx", clip, (2, 3))
    if ctx.dim() == 3:
        raise ValueError(
            f"{ck.path}: a class-specific KgCoOp context {list(ctx.shape)}; promptlab's KgCoOp is unified"
        )
    return {**hp, "n_ctx": ctx.shape[0], "ctx_init": None}, {"ctx": ctx}


def _maple(ck: DasslCheckpoint, clip: FrozenCLIP, hp: dict[str, Any]) -> Converted:
    p = "prompt_learner."
    ctx = _context(ck, p + "ctx", clip)  # [n, W]
    state = {
        "ctx": ctx,
        "proj.weight": _read(ck, p + "proj.weight", (2,)),
        "proj.bias": _read(ck, p + "proj.bias", (1,)),
    }
    texts = _indexed(ck, p + "compound_prompts_text.{}", 0)  # blocks 1..depth-1, [n, W] each
    projs = _indexed(ck, p + "compound_prompt_projections.{}.weight", 0)
    if len(projs) != len(texts):
        raise ValueError(f"{ck.path}: {len(texts)} deep text prompts but {len(projs)} projections")
    if texts:
        state["text_deep"] = torch.stack([_read(ck, k, (2,)) for k in texts])  # [depth - 1, n, W]
    for j, k in enumerate(projs):
        state[f"deep_proj.{j}.weight"] = _read(ck, k, (2,))
        state[f"deep_proj.{j}.bias"] = _read(ck, k[: -len("weight")] + "bias", (1,))
    n = ctx.shape[0]
    hp = {"ctx_init": "a photo of a", **hp}
    return {**hp, "n_ctx": n, "ctx_init": _words(hp["ctx_init"], n), "prompt_depth": 1 + len(texts)}, state


def _ivlp(ck: DasslCheckpoint, clip: FrozenCLIP, hp: dict[str, Any]) -> Converted:
    ctx = _context(ck, "prompt_learner.ctx", clip)  # [n_t, W]
    text = _indexed(ck, "text_encoder.transformer.resblocks.{}.VPT_shallow", 1)  # blocks 1..depth-1
    vis = _indexed(ck, "image_encoder.transformer.resblocks.{}.VPT_shallow", 1)
    # clip/model.py ResidualAttentionBlock_IVLP and VisionTransformer.forward use every one of these
    # prompts as .half(), in fp32 runs too: the values the reference computes with are fp16-rounded.
    state = {"ctx": ctx}
    if text:
        state["text_deep"] = (
            torch.stack([_read(ck, k, (2,)) for k in text]).half().float()
        )  # [d_t - 1, n_t, W]
    has_vis = "image_encoder.VPT" in ck.state_dict
    if has_vis:
        state["vis_ctx"] = _read(ck, "image_encoder.VPT", (2,)).half().float()  # [n_v, Wv]
    elif vis:
        raise ValueError(f"{ck.path}: deep vision prompts without image_encoder.VPT")
    if vis:
        state["vis_deep"] = (
            torch.stack([_read(ck, k, (2,)) for k in vis]).half().float()
        )  # [d_v - 1, n_v, Wv]
    n = ctx.shape[0]
    hp = {"ctx_init": "a photo of a", **hp}
    return {
        **hp,
        "n_ctx_text": n,
        "n_ctx_vision": state["vis_ctx"].shape[0] if has_vis else 0,
        "ctx_init": _words(hp["ctx_init"], n),
        "prompt_depth_text": 1 + len(text),
        "prompt_depth_vision": 1 + len(vis) if has_vis else 0,
    }, state


SOURCES: dict[str, _Source] = {
    "coop": _Source("coop", "prompt_learner", _coop),
    "cocoop": _Source("cocoop", "prompt_learner", _cocoop),
    "kgcoop": _Source("kgcoop", "prompt_learner", _kgcoop),
    "maple": _Source("maple", "MultiModalPromptLearner", _maple),
    "ivlp": _Source("ivlp", "VLPromptLearner", _ivlp),
    # PromptSRC's prompted model is IVLP's (same names; its ZS_image_encoder copy of CLIP is not read)
    "promptsrc": _Source("promptsrc", "VLPromptLearner", _ivlp),
}


def import_checkpoint(
    path: str | Path,
    clip: FrozenCLIP,
    classnames: Sequence[str],
    *,
    source: str = "coop",
    epoch: int | str | None = None,
    **hparams: Any,
) -> PromptModule:
    """Build the promptlab method equivalent to a reference checkpoint, with its learned tensors.

    Args:
        path: the checkpoint file, its model directory or the run directory (see :func:`find_checkpoint`).
        clip: the backbone the prompts were learned on (same widths; promptlab computes in fp32).
        classnames: the classes to serve; a class-specific CoOp context needs exactly its own.
        source: ``coop``, ``cocoop``, ``kgcoop``, ``maple``, ``ivlp`` or ``promptsrc``.
        epoch: which checkpoint of a run directory (``None``: the last; an int; ``"best"``).
        **hparams: what the checkpoint does not record: ``class_token_position`` (CoOp, default
            ``end``); ``ctx_init`` (MaPLe / IVLP / PromptSRC: the words around the learned tokens, default the
            configs' ``"a photo of a"``); ``template`` / ``w`` (KgCoOp's training loss only).

    Returns:
        The method's module, on ``clip``'s device, whose logits are the reference's.

    Raises:
        ValueError: unknown source, a file that is not such a checkpoint (or is unsafe to read), or
            tensors that do not fit ``clip`` or ``classnames``.
        FileNotFoundError: no checkpoint at ``path``.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    spec = SOURCES[source]
    file = find_checkpoint(path, spec.model_name, epoch)
    ck = read_dassl_checkpoint(file)
    kwargs, state = spec.convert(ck, clip, {k: v for k, v in hparams.items() if v is not None})
    classnames = list(classnames)
    ctx = state["ctx"]
    if ctx.dim() == 3 and ctx.shape[0] != len(classnames):
        raise ValueError(
            f"{file}: class-specific context learned for {ctx.shape[0]} classes, but {len(classnames)} class "
            "names were given; CSC prompts serve only the classes they were trained on, in the same order"
        )
    try:
        with torch.random.fork_rng(
            devices=[]
        ):  # the random init is overwritten; keep the caller's RNG stream
            module = METHODS[spec.method](clip, classnames, **kwargs)
    except TypeError as e:
        raise ValueError(f"{file}: cannot build {spec.method} with {kwargs} ({e})") from e
    module.load_prompt_state_dict(state, source=str(file))
    log.info(
        "imported %s from %s (epoch %s): %s",
        spec.method,
        file,
        ck.epoch,
        ", ".join(f"{k} {list(v.shape)}" for k, v in state.items()),
    )
    return module.to(clip.device)
