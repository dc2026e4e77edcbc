"""PromptModule, the class users subclass to invent a method, and the shared prompt maths.

A method learns a few tensors around a frozen :class:`~promptlab.clip.FrozenCLIP`. The engine
never asks a method for its name: it reads the capabilities declared here (``image_side_frozen``,
``text_depends_on_image``, ``trainable_backbone_parts``) to decide on feature caching, text-feature
caching at evaluation and optimizer groups.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP


def clean_classname(name: str) -> str:
    """CoOp's class-name normalisation: underscores become spaces."""
    return name.replace("_", " ").strip()


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitFeatures:
    """The image features a method's :meth:`PromptModule.fit` asks for.

    Attributes:
        views: feature sets per training image (Tip-Adapter and GDA: 10 augmented views, the
            references' ``augment_epoch``; the linear probe: 1).
        augment: draw the views with the training transform (random crop + flip, ``data.crop_scale``);
            ``False``: the evaluation transform (lpclip encodes the training images un-augmented).
    """

    views: int = 1
    augment: bool = False


@dataclass
class FitData:
    """Image features of the training and validation splits, as :meth:`PromptModule.fit` receives them.

    Features are the image tower's output (``encode_image``), not normalised: each method normalises
    as its reference does.

    Attributes:
        train: [V, N, D] features of the N training images under V views.
        train_labels: [N] their labels.
        val: [M, D] features of the validation images (evaluation transform), for hyperparameter searches.
        val_labels: [M].
        val_split: where ``val`` came from: ``"val"``, or ``"train"`` (first view) when the dataset has no
            validation split (ImageNet): a search never looks at the test split.
    """

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    val_split: str = "val"


class PromptModule(nn.Module):
    """Base class of every prompt-learning method.

    Subclasses implement ``__init__(self, clip, classnames, **hparams)`` (keyword names are the recipe
    keys), build their class-derived buffers in ``set_classnames`` and produce logits in
    ``logits(image_features)`` (or override ``forward`` when they need raw images).

    Learned tensors are ``nn.Parameter``s; tensors derived from class names are buffers with
    ``persistent=False`` so that checkpoints and exports hold only what was learned.
    """

    #: Image features may be computed once and cached (the image tower is neither prompted nor tuned).
    image_side_frozen: ClassVar[bool] = True
    #: The text features depend on the image (CoCoOp): they cannot be computed once per evaluation.
    text_depends_on_image: ClassVar[bool] = False
    #: Names of FrozenCLIP sub-modules this method unfreezes (e.g. image-tower LayerNorms).
    trainable_backbone_parts: ClassVar[tuple[str, ...]] = ()
    #: Learned tensors (parameter names or module prefixes) that the reference keeps in fp32 even with
    #: PREC=fp16, because it creates them outside the fp16 CLIP (e.g. MaPLe's deep prompts). Every other
    #: learned tensor takes ``clip.prompt_dtype`` in :meth:`match_backbone_precision`.
    fp32_in_reference: ClassVar[tuple[str, ...]] = ()
    #: What was learned belongs to the classes it was learned on (CoOp's class-specific context):
    #: ``set_classnames`` then refuses any other list of names, even one of the same length, instead
    #: of silently applying class i's context to another class i. A property where an hparam decides.
    class_bound: bool = False
    #: The logits are the scaled cosine between image features and :meth:`text_features` (the export
    #: writes those as class embeddings). False for a classifier of another form (a linear probe, a cache).
    text_classifier: ClassVar[bool] = True
    #: Features a training-free fit needs (Tip-Adapter, GDA, linear probe): the runner encodes them and
    #: calls :meth:`fit` once, before any training (none when ``None``). An instance may set it from hparams.
    fit_features: FitFeatures | None = None
    #: The tensors :meth:`fit` sets (persistent buffers or parameters; exported with the learned ones).
    #: Their shapes are the fit's (e.g. one cache key per training image): :meth:`load_prompt_state_dict`
    #: takes them at the saved shape instead of refusing it.
    fitted_state: ClassVar[tuple[str, ...]] = ()

    hparams: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record the keyword arguments a method was built with (defaults applied), so that an export
        # can rebuild it with `Method(clip, classnames, **hparams)` without each method saying so.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self, *args: Any, **kw: Any) -> None:
            if not hasattr(self, "_recording"):
                object.__setattr__(self, "_recording", True)
                bound = sig.bind(self, *args, **kw)
                bound.apply_defaults()
                hp = {k: v for k, v in bound.arguments.items() if k not in ("self", "clip", "classnames")}
                hp.update(hp.pop("hparams", {}) if isinstance(hp.get("hparams"), dict) else {})
                init(self, *args, **kw)
                object.__setattr__(self, "hparams", _as_used(self, hp))
            else:
                init(self, *args, **kw)

        cls.__init__ = wrapped

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str]):
        super().__init__()
        self.clip = clip
        self.classnames: list[str] = list(classnames)
        self._text_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ to implement
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-derived buffers for new class names, keeping what was learned.

        Subclasses call ``super().set_classnames(names)`` first; for a ``class_bound`` method the
        first call fixes the names the learned state belongs to and later calls must repeat them.
        """
        names = list(classnames)
        learned_for = self.__dict__.get("_learned_classnames")
        if self.class_bound and learned_for is not None and not self.can_serve(names, learned_for):
            other = next((f"{a!r} -> {b!r}" for a, b in zip(learned_for, names) if a != b), "")
            raise ValueError(
                f"{type(self).__name__}'s learned state is specific to the {len(learned_for)} classes it was "
                f"learned on and cannot serve {len(names)} other ones"
                + (f" (first difference: {other})" if other else "")
                + "; evaluate it on those classes, or learn a class-independent one for transfer"
            )
        if self.class_bound and learned_for is None:
            self.__dict__["_learned_classnames"] = names
        self.classnames = names

    def can_serve(self, classnames: list[str], learned_for: list[str]) -> bool:
        """Whether a ``class_bound`` method's learned state can serve ``classnames`` (it was learned on
        ``learned_for``, the first names it was given). Default: only those names, in that order. A method
        whose fit covers more classes than it was trained on (GDA's classifier for the new half,
        synthesised from their text features) widens this to the classes it has a classifier for."""
        return classnames == learned_for

    def text_features(self) -> torch.Tensor:
        """[C, D] text features of the current classes (image-independent methods)."""
        raise NotImplementedError(f"{type(self).__name__} has no image-independent text features")

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, D] image features -> [B, C] logits. Default: CLIP's scaled cosine similarity."""
        img = F.normalize(image_features.to(self.head_dtype), dim=-1)
        txt = F.normalize(self.class_text_features().to(self.head_dtype), dim=-1)
        return self.clip.logit_scale * img @ txt.t()

    # ------------------------------------------------------------------ shared behaviour
    def forward(
        self, images: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, C] from images [B, 3, H, W] or from precomputed image features [B, D]."""
        if image_features is None:
            if images is None:
                raise ValueError("forward() needs images or image_features")
            image_features = self.encode_image(images)
        return self.logits(image_features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [B, D] as this method sees them (what the engine caches when frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.image_side_frozen):
            return self.clip.encode_image(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        """Training objective; methods add their regularisers here."""
        return F.cross_entropy(logits, labels)

    def training_step(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch -> ``(logits [B, C], loss)``; the engine calls this, under autocast.

        ``inputs`` is what the task's batches hold (``images``, ``image_features``, ``masks``, ...; see
        :mod:`promptlab.engine`). The default is ``forward(**inputs)`` then ``loss(logits, labels,
        **inputs)``; a method whose loss needs more than the logits (AnomalyCLIP's pixel maps)
        overrides this instead of the loop. ``logits`` feed the epoch's training accuracy.
        """
        logits = self(**inputs)
        return logits, self.loss(logits, labels, **inputs)

    def class_text_features(self) -> torch.Tensor:
        """Text features, from the evaluation cache when one is active."""
        return self._text_cache if self._text_cache is not None else self.text_features()

    def cached_text_features(self) -> AbstractContextManager[None]:
        """Compute image-independent text features once for a whole evaluation (none for a classifier
        that is not made of text features)."""
        return contextmanager(self._text_cache_scope)()

    def _text_cache_scope(self) -> Iterator[None]:
        """The generator behind :meth:`cached_text_features`, undecorated: mutmut skips decorated functions."""
        if self.text_depends_on_image or not self.text_classifier:
            yield
            return
        with torch.no_grad():
            self._text_cache = self.text_features()
        try:
            yield
        finally:
            self._text_cache = None

    def class_embeddings(self) -> torch.Tensor:
        """[C, D] L2-normalised text features: the classifier, usable without promptlab."""
        with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
            return F.normalize(self.text_features().float(), dim=-1)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Fit from the training split's features, without an optimizer (called when ``fit_features`` is set).

        Runs once before training: a training-free method (Tip-Adapter, GDA, a linear probe) is complete
        after it; one with a fine-tuning stage (Tip-Adapter-F) is then trained by the engine as usual.
        Searches for hyperparameters use ``data.val``, never the test split.

        Returns:
            A JSON-able record of what was fitted and searched (``metrics.json``: ``train.fit``).
        """
        raise NotImplementedError(f"{type(self).__name__} sets fit_features but does not implement fit()")

    def after_train(self) -> dict[str, Any]:
        """Called once after the last training epoch, before evaluation (Tip-Adapter-F searches its mixing
        weights again with the keys it trained). Returns a JSON-able record (``metrics.json``: ``train.after``)."""
        return {}

    def begin_eval(self) -> None:
        """Called before an evaluation pass: reset any statistics the method collects (e.g. routing)."""

    def observe_eval(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Called by the evaluation loop after each batch's forward pass, with the batch's true labels
        (the forward pass never sees them): lets a method keep statistics per true class."""

    def end_eval(self) -> dict[str, Any]:
        """Called after an evaluation pass: statistics to report beside the accuracy (JSON-able)."""
        return {}

    # ------------------------------------------------------------------ training hooks (called by engine.train)
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of a training step's ``loss`` (already scaled by the engine for
        gradient accumulation and fp16 loss scaling) into ``.grad``: the gradient-manipulation hook.

        Default ``loss.backward()``. A method that edits its gradient before the optimizer step (ProGrad:
        drop the part that conflicts with a second loss's gradient) overrides this; it must *add* to
        ``.grad`` (the engine accumulates over micro-batches) and stay linear in ``loss`` (the scale).
        """
        loss.backward()

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Called after the last optimizer step of epoch ``epoch`` (1-based) of ``epochs``, before the
        epoch's checkpoint is written: per-epoch state such as PromptSRC's Gaussian-weighted prompt average."""

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """State that ``end_epoch`` carries across epochs (not learned tensors), saved in training
        checkpoints so that a resumed run ends with the same numbers. Default: none."""
        return {}

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state_dict` returned (an empty dict: start afresh)."""

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D] features of the unprompted, untuned image tower (no graph): the zero-shot teacher that
        self-consistency losses (PromptSRC) compare the prompted features with, on the same images."""
        with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
            return self.clip.encode_image(images)

    def register_class_buffers(self, tensors: dict[str, torch.Tensor]) -> None:
        """Register class-derived tensors as non-persistent buffers: rebuilt by ``set_classnames``, never saved."""
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)

    def match_backbone_precision(self) -> None:
        """Give the learned tensors the dtype the reference gives them on this backbone (call once, after
        building, before the optimizer): fp16 under ``model.precision=reference_fp16``, so that SGD
        steps fp16 parameters with fp16 gradients and momentum, as the references did. No-op otherwise."""
        dtype = self.clip.prompt_dtype
        for name, p in self.named_parameters():
            kept = any(name == k or name.startswith(k + ".") for k in self.fp32_in_reference)
            if p.requires_grad and not name.startswith("clip.") and not kept:
                p.data = p.data.to(dtype)

    @property
    def head_dtype(self) -> torch.dtype:
        """dtype of the normalised features, logits and loss: the reference's fp16 head under
        ``reference_fp16`` (``logit_scale.exp() * image_features @ text_features.t()`` in fp16), else fp32."""
        return self.clip.prompt_dtype

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: ``[{"params": [...], "lr_scale": s}, ...]``.

        The runner builds the optimizer from these and the engine sets each group's lr to the
        schedule's lr times its ``lr_scale`` (1 when absent), so a method can train part of its
        tensors slower (MoCoOp: the image tower's LayerNorms at lr x 0.1) without its own loop.
        Default: one group of every trainable parameter. Every trainable parameter must appear once.
        """
        return [{"params": self.trainable_parameters()}]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """The learned tensors only: the method's parameters and any unfrozen backbone part."""
        learned = {n for n, p in self.named_parameters() if p.requires_grad or not n.startswith("clip.")}
        return {
            k: v.detach() for k, v in self.state_dict().items() if k in learned or not k.startswith("clip.")
        }

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Load learned tensors, with errors that say which tensor and why."""
        own = self.prompt_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"{source} does not match {type(self).__name__}: missing {missing}, unexpected {unexpected}"
            )
        for k in self.fitted_state:  # shapes decided by fit(): take the saved one
            if k in state and tuple(state[k].shape) != tuple(own[k].shape):
                self._resize_fitted(k, state[k].shape)
                own[k] = self.prompt_state_dict()[k]
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"{source}: '{k}' has shape {list(v.shape)}, {type(self).__name__} expects {list(own[k].shape)} "
                    f"(different backbone width or class count?)"
                )
        self.load_state_dict({**self.state_dict(), **{k: v.to(own[k].dtype) for k, v in state.items()}})

    def _resize_fitted(self, name: str, shape: Sequence[int]) -> None:
        """Give a fitted tensor (parameter or buffer) a new shape, keeping its kind, dtype and device."""
        old = getattr(self, name)
        new = old.new_zeros(tuple(shape))
        if isinstance(old, nn.Parameter):
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            self.register_buffer(name, new)


class HandCraftedTextClassifier(PromptModule):
    """A method whose text side is CLIP's zero-shot classifier of hand-written prompts, fixed (feature adapters,
    caches, discriminants on the image side). Subclasses set ``self.templates`` before calling ``set_classnames``.
    """

    templates: list[str]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        # _text [C, D]: normalised, averaged over the templates
        self.register_class_buffers(
            {"_text": hand_crafted_features(self.clip, self.classnames, self.templates)}
        )

    def text_features(self) -> torch.Tensor:
        return self._text


def _as_used(module: nn.Module, hparams: dict[str, Any]) -> dict[str, Any]:
    """The hparams as the method used them: a plain attribute of the same name wins over the argument.

    A method that overrides an argument (CoOp's rule: ``ctx_init`` sets ``n_ctx``) stores what it used
    as ``self.<name>``; recording the argument instead would describe a model that was never built.
    """
    used = dict(hparams)
    for k, v in hparams.items():
        attr = module.__dict__.get(k, v)
        if isinstance(attr, (bool, int, float, str)) and attr != v and type(attr) is type(v):
            used[k] = attr
    return used


# ---------------------------------------------------------------------- shared prompt maths
def word_embeddings(clip: FrozenCLIP, words: str) -> torch.Tensor:
    """[n, W] token embeddings of ``words`` (no start/end tokens): to initialise context from text."""
    ids = clip.tokenize(words)
    s = clip.n_start_tokens
    n = int(clip.eot_index(ids)[0]) - s
    if n <= 0:
        raise ValueError(f"ctx_init={words!r} has no tokens")
    with torch.no_grad():
        return clip.embed_tokens(ids)[0, s : s + n].float().clone()


def init_context(clip: FrozenCLIP, n_ctx: int, ctx_init: str | None = "") -> torch.Tensor:
    """Initial context vectors [n, W]: the embeddings of ``ctx_init``'s tokens, or N(0, 0.02) when empty or None.

    With words, ``n`` is their token count (CoOp counts words; the two agree for "a photo of a").
    """
    if ctx_init:
        ctx = word_embeddings(clip, ctx_init.replace("_", " "))
        if ctx.shape[0] != n_ctx:
            log.warning(
                "n_ctx=%d is not used: ctx_init=%r gives %d context tokens (CoOp's rule: the words set the "
                "length; the run records n_ctx=%d). For %d random context vectors set ctx_init to ''.",
                n_ctx,
                ctx_init,
                ctx.shape[0],
                ctx.shape[0],
                n_ctx,
            )
        return ctx
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive number of context tokens, got {n_ctx!r}")
    return nn.init.normal_(torch.empty(n_ctx, clip.width), std=0.02)


def n_tokens(clip: FrozenCLIP, text: str) -> int:
    """Number of BPE tokens of ``text`` without start/end tokens."""
    return int(clip.eot_index(clip.tokenize(text))[0]) - clip.n_start_tokens


def build_prompt_layout(
    clip: FrozenCLIP,
    classnames: Sequence[str],
    n_ctx: int,
    position: str = "end",
    suffix: str = ".",
    *,
    n_before: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids with ``n_ctx`` context slots around each class name, CoOp's layout.

    The context goes before the class name (``end``: "[SOS] X..X name. [EOT]"), around it
    (``middle``: first half before, second half after) or after it (``front``). ``n_before``
    splits it explicitly: that many slots before the name, the rest after (a hand-crafted
    template's words around ``{}``, e.g. "a photo of a {}, a type of pet."); it overrides ``position``.

    Returns:
        ids [C, L]: token ids, context slots holding a placeholder token;
        ctx_pos [C, n_ctx]: positions of the context slots, in context order;
        eot [C]: position of each end-of-text token.
    """
    if position not in ("end", "middle", "front"):
        raise ValueError(f"class_token_position={position!r}: expected 'end', 'middle' or 'front'")
    if n_before is not None:
        if not 0 <= n_before <= n_ctx:
            raise ValueError(f"n_before={n_before} must lie in [0, n_ctx={n_ctx}]")
        position = "middle"
    names = [clean_classname(c) for c in classnames]
    prefix = " ".join(["X"] * n_ctx)
    ids = clip.tokenize(
        [f"{prefix} {name}{suffix}" if n_ctx else f"{name}{suffix}" for name in names]
    )  # [C, L]
    name_lens = [n_tokens(clip, name) for name in names]
    half = n_ctx // 2 if n_before is None else n_before
    s = clip.n_start_tokens  # CLIP's [SOS]: 1; SigLIP's tokenizer puts nothing first: 0
    rows, pos = [], []
    for row, n in zip(ids, name_lens):
        sos, ctx, name, rest = (
            row[:s],
            row[s : s + n_ctx],
            row[s + n_ctx : s + n_ctx + n],
            row[s + n_ctx + n :],
        )
        if position == "end":
            parts, p = [sos, ctx, name, rest], list(range(s, s + n_ctx))
        elif position == "middle":
            parts = [sos, ctx[:half], name, ctx[half:], rest]
            p = list(range(s, s + half)) + list(range(s + half + n, s + n_ctx + n))
        else:
            parts, p = [sos, name, ctx, rest], list(range(s + n, s + n + n_ctx))
        rows.append(torch.cat(parts))
        pos.append(p)
    ids = torch.stack(rows)
    ctx_pos = torch.tensor(pos, dtype=torch.long, device=ids.device).reshape(len(names), n_ctx)
    return ids, ctx_pos, clip.eot_index(ids)


def insert_context(base: torch.Tensor, ctx: torch.Tensor, ctx_pos: torch.Tensor) -> torch.Tensor:
    """Place context vectors into prompt embeddings.

    Args:
        base: [C, L, W] token embeddings of the prompt layout.
        ctx: [n_ctx, W] (unified), [C, n_ctx, W] (class-specific) or [B, C, n_ctx, W] (per image).
        ctx_pos: [C, n_ctx] positions of the context slots.

    Returns:
        [C, L, W], or [B, C, L, W] for per-image context.
    """
    C, L, W = base.shape
    lead = ctx.shape[:-3] if ctx.dim() == 4 else ()
    ctx = ctx.expand(*lead, C, ctx_pos.shape[1], W) if ctx.dim() >= 3 else ctx.expand(C, -1, -1)
    x = base.expand(*lead, C, L, W).clone().to(ctx.dtype)
    idx = ctx_pos.expand(*lead, C, -1).unsqueeze(-1).expand(*lead, C, ctx_pos.shape[1], W)
    return x.scatter(-2, idx, ctx)


def encode_prompts(clip: FrozenCLIP, x: torch.Tensor, eot: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Text features of prompt embeddings with any leading batch shape: [..., L, W] -> [..., D]."""
    lead = x.shape[:-2]
    feats = clip.encode_text_embeddings(x.reshape(-1, *x.shape[-2:]), eot.expand(*lead).reshape(-1), **kw)
    return feats.reshape(*lead, -1)


def prompt_buffers(
    clip: FrozenCLIP, classnames: Sequence[str], n_ctx: int, position: str = "end", prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The class-derived tensors of a context prompt, ready for ``register_buffer(..., persistent=False)``.

    Args:
        clip: the backbone (tokenizer, token embeddings).
        classnames: class names (underscores become spaces).
        n_ctx: number of learned context slots.
        position: class-token position, as in :func:`build_prompt_layout` (used when ``prefix`` is empty).
        prefix: words in front of the class name whose first ``n_ctx`` tokens are the context slots and
            whose remaining tokens stay fixed words, as MaPLe / IVLP build "a photo of a {name}." with
            ``n_ctx=2``: "[SOS] [V1] [V2] of a {name}. [EOT]". Requires ``position="end"``.

    Returns:
        ``{"_base": [C, L, W] token embeddings cut to the longest prompt, "_ctx_pos": [C, n_ctx],
        "_eot": [C]}``, the names :func:`insert_context` / :func:`encode_prompts` callers use.
    """
    if prefix:
        if position != "end":
            raise ValueError(f"a fixed prompt prefix needs class_token_position='end', got {position!r}")
        if n_tokens(clip, prefix) < n_ctx:
            raise ValueError(f"prefix {prefix!r} has fewer than n_ctx={n_ctx} tokens")
        ids = clip.tokenize([f"{prefix} {clean_classname(c)}." for c in classnames])  # [C, 77]
        s = clip.n_start_tokens
        pos = torch.arange(s, s + n_ctx, device=ids.device).expand(len(classnames), -1).contiguous()
        eot = clip.eot_index(ids)
    else:
        ids, pos, eot = build_prompt_layout(clip, classnames, n_ctx, position)
    L = int(eot.max()) + 1 if clip.can_truncate_text else ids.shape[1]  # a bidirectional tower sees padding
    with torch.no_grad():
        base = clip.embed_tokens(ids[:, :L]).float()  # [C, L, W]
    return {"_base": base, "_ctx_pos": pos, "_eot": eot}


def hand_crafted_features(
    clip: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str], *, normalize_each: bool = True
) -> torch.Tensor:
    """[C, D] L2-normalised text features of hand-written prompts, averaged over ``templates``.

    Each template's features are normalised before the mean and the mean is normalised again (CLIP's
    prompt ensembling); with one template this is just its normalised feature. ``normalize_each=False``
    averages the raw features instead (PromptSRC's frozen text features, trainers/promptsrc.py L122-128).
    """
    names = [clean_classname(c) for c in classnames]
    with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
        raw = (clip.encode_text(clip.tokenize([t.format(n) for n in names])).float() for t in templates)
        feats = torch.stack([F.normalize(f, dim=-1) if normalize_each else f for f in raw])  # [T, C, D]
        return F.normalize(feats.mean(0), dim=-1)


def knowledge_distance(text_features: torch.Tensor, hand: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 - mean_c cos(t_c, t_c^hand)``, KgCoOp's knowledge-guided term (TCP reuses it): scalar, 0 when the
    learned [C, D] text features point along the [C, D] normalised hand-crafted ones. Computed in ``dtype``
    (fp16 under ``reference_fp16``, as the references' score), eps 1e-7 as their CosineSimilarity."""
    txt = F.normalize(text_features.to(dtype), dim=-1)
    return 1.0 - F.cosine_similarity(txt, hand.to(dtype), dim=-1, eps=1e-7).mean()


def leading_context(clip: FrozenCLIP, n_ctx: int, ctx_init: str | None) -> tuple[torch.Tensor, str]:
    """Context vectors [n_ctx, W] and the prompt prefix text, the IVLP / MaPLe way.

    With ``ctx_init`` the context is the embedding of its first ``n_ctx`` tokens and the prefix is the
    whole of ``ctx_init`` (its remaining tokens stay as fixed words, see :func:`prompt_buffers`);
    without, N(0, 0.02) vectors behind an "X X ..." placeholder prefix.
    """
    if ctx_init:
        words = ctx_init.replace("_", " ")
        init = word_embeddings(clip, words)  # [n, W]
        if init.shape[0] < n_ctx:
            raise ValueError(f"ctx_init={ctx_init!r} has {init.shape[0]} tokens, fewer than n_ctx={n_ctx}")
        return init[:n_ctx].clone(), words
    return nn.init.normal_(torch.empty(n_ctx, clip.width), std=0.02), " ".join(["X"] * n_ctx)


def encode_context_prefix(
    clip: FrozenCLIP, base: torch.Tensor, ctx: torch.Tensor, eot: torch.Tensor
) -> torch.Tensor:
    """Text features of "[SOS] ctx [class tokens]" prompts whose context is shared by every class.

    The start token and the context form a prefix common to all C prompts (of one image, for
    image-conditioned context), so the causal tower runs it once instead of C times.

    Args:
        base: [C, L, W] prompt embeddings (``build_prompt_layout`` with position "end").
        ctx: [n_ctx, W] unified context, or [G, n_ctx, W] one context per group (e.g. per image).
        eot: [C] end-of-text positions.

    Returns:
        [C, D] for a 2-D ctx, [G, C, D] for a 3-D ctx.
    """
    grouped = ctx.dim() == 3
    ctx = ctx if grouped else ctx.unsqueeze(0)  # [G, n, W]
    n, s = ctx.shape[1], clip.n_start_tokens
    prefix = torch.cat([base[:1, :s].expand(ctx.shape[0], s, -1).to(ctx.dtype), ctx], dim=1)  # [G, s + n, W]
    feats = clip.encode_text_prefixed(prefix, base[:, s + n :], eot)  # [G, C, D]
    return feats if grouped else feats[0]


def deep_prompt_tokens(n_layers: int, depth: int, n: int, width: int, what: str = "") -> nn.Parameter | None:
    """Learned tokens [depth - 1, n, width], N(0, 0.02), for blocks 1..depth-1 of a tower; None at depth <= 1.

    "Prompt depth" counts the shallow prompt (block 0's input) too, as MaPLe / IVLP do: depth 9 means
    the input prompt plus replacements before blocks 1..8. Depth beyond the tower is an error.
    """
    if not 0 <= depth <= n_layers:
        raise ValueError(
            f"{what} prompt depth {depth}: expected 0..{n_layers} (the tower has {n_layers} blocks)"
        )
    if depth <= 1:
        return None
    return nn.Parameter(nn.init.normal_(torch.empty(depth - 1, n, width), std=0.02))


def layer_prompts(deep: torch.Tensor | Sequence[torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """[depth - 1, n, W] (or a list of [n, W]) -> {1: [n, W], ..., depth - 1: [n, W]}, FrozenCLIP's deep-prompt keys."""
    return {} if deep is None else {i + 1: t for i, t in enumerate(deep)}


def independent_vl_prompts(
    clip: FrozenCLIP,
    n_ctx_text: int,
    n_ctx_vision: int,
    ctx_init: str | None,
    depth_text: int,
    depth_vision: int,
    what: str,
) -> tuple[str, dict[str, nn.Parameter | None]]:
    """IVLP-style prompts in both towers: the prompt prefix text and the learned tensors.

    Returns ``(prefix, {"ctx": [n_t, W], "text_deep": [d_t - 1, n_t, W] | None,
    "vis_ctx": [n_v, Wv] | None, "vis_deep": [d_v - 1, n_v, Wv] | None})`` for a module to set as
    attributes (IVLP, ViFi-CLIP's prompt stage).
    """
    if depth_text < 1:
        raise ValueError(f"{what} needs prompt_depth_text >= 1 (the text prompt is what it classifies with)")
    if depth_vision > 0 and not clip.vision_layers:
        raise ValueError(f"{clip.arch}: visual prompts need a ViT image tower")
    ctx, prefix = leading_context(clip, n_ctx_text, ctx_init)
    vis_ctx = (
        nn.init.normal_(torch.empty(n_ctx_vision, clip.vision_width), std=0.02) if depth_vision > 0 else None
    )
    return prefix, {
        "ctx": nn.Parameter(ctx),
        "text_deep": deep_prompt_tokens(clip.text_layers, depth_text, n_ctx_text, clip.width, "text"),
        "vis_ctx": nn.Parameter(vis_ctx) if vis_ctx is not None else None,
        "vis_deep": deep_prompt_tokens(
            clip.vision_layers, depth_vision, n_ctx_vision, clip.vision_width or 0, "vision"
        ),
    }
