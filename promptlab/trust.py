"""What a shared file may make promptlab run: the trust rule for ``_component_`` paths.

Recipes, run folders (their ``config.yaml``) and dataset YAMLs are shared like papers, so opening
one must not run code its author chose. A ``_component_`` names a Python object by dotted path and
building it calls that object; importing a module runs its top-level code. So a path is checked
twice, against the *role* of the node that names it:

1. before anything is imported: the path must lie in a module promptlab trusts for that role
   (``promptlab.*``; ``torch.optim.*`` for optimizers and schedulers) or in a module the user
   trusted explicitly, and no part of it may be private (``_x``, ``__main__``);
2. after the import, before any call: the object must be what the role builds. ``method``: a
   :class:`~promptlab.prompts.PromptModule` subclass; ``optimizer`` / ``scheduler``: a torch
   optimizer / lr-scheduler class; ``generator`` / ``reader``: a function promptlab registered as a
   dataset generator / reader (:func:`register`).

A user's own module (``mymethods.TempCoOp``) is imported only when the user opts in, either with
``promptlab --trust-module mymethods ...`` or with ``PROMPTLAB_TRUSTED_MODULES=mymethods`` (comma
separated; a name trusts the module and its submodules). A path into a trusted module may then name
anything *defined* there (the user's own method, optimizer, generator, reader); what such a module
merely imports (``mymethods.os.system``) still has to fit the role.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "CLASS_KINDS",
    "KINDS",
    "TRUST_ENV",
    "UntrustedComponent",
    "check_object",
    "check_path",
    "register",
    "trust_modules",
    "trusted_modules",
]

TRUST_ENV = "PROMPTLAB_TRUSTED_MODULES"
#: Role -> module prefixes trusted without an opt-in.
_BUILTIN_ROOTS: dict[str, tuple[str, ...]] = {
    "method": ("promptlab",),
    "optimizer": ("promptlab", "torch.optim"),
    "scheduler": ("promptlab", "torch.optim"),
    "generator": ("promptlab",),
    "reader": ("promptlab",),
}
KINDS = tuple(_BUILTIN_ROOTS)
#: What a ``_component_`` node of unspecified role (a nested node) may build: classes only.
CLASS_KINDS = ("method", "optimizer", "scheduler")
_REGISTERED: dict[str, list[Callable[..., Any]]] = {"generator": [], "reader": []}
_WHAT = {
    "method": "a PromptModule subclass",
    "optimizer": "a torch optimizer class",
    "scheduler": "a torch lr-scheduler class",
    "generator": "a registered promptlab dataset generator",
    "reader": "a registered promptlab dataset reader",
}

F = TypeVar("F", bound=Callable[..., Any])


class UntrustedComponent(ValueError):
    """A ``_component_`` path or object that its role does not allow; nothing was called."""


def register(kind: str) -> Callable[[F], F]:
    """Decorator: mark a promptlab function as a dataset ``generator`` or ``reader`` a YAML may name."""
    if kind not in _REGISTERED:
        raise ValueError(f"only {sorted(_REGISTERED)} are registered, not {kind!r}")

    def deco(fn: F) -> F:
        _REGISTERED[kind].append(fn)
        return fn

    return deco


def trusted_modules() -> tuple[str, ...]:
    """The modules the user trusted (``$PROMPTLAB_TRUSTED_MODULES``, set also by ``--trust-module``)."""
    raw = os.environ.get(TRUST_ENV, "")
    return tuple(m for m in (p.strip() for p in raw.replace(";", ",").split(",")) if m)


def trust_modules(names: Iterable[str]) -> None:
    """Trust ``names`` in this process and in the processes it starts (sweep jobs, torchrun ranks)."""
    new = [n.strip() for n in names if n.strip()]
    if new:
        os.environ[TRUST_ENV] = ",".join(dict.fromkeys([*trusted_modules(), *new]))


def _under(dotted: str, roots: Iterable[str]) -> bool:
    return any(dotted == r or dotted.startswith(r + ".") for r in roots)


def _kinds(kinds: str | Sequence[str] | None) -> tuple[str, ...]:
    out = CLASS_KINDS if kinds is None else ((kinds,) if isinstance(kinds, str) else tuple(kinds))
    unknown = [k for k in out if k not in _BUILTIN_ROOTS]
    if unknown:
        raise ValueError(f"unknown component role(s) {unknown}; roles: {', '.join(KINDS)}")
    return out


def _roles(kinds: tuple[str, ...]) -> str:
    return " or ".join(_WHAT[k] for k in kinds)


def _opt_in_hint(dotted: str) -> str:
    module = dotted.rsplit(".", 1)[0]
    return (
        f"if {module!r} is your own code, trust it explicitly: `promptlab --trust-module {module} ...` "
        f"or {TRUST_ENV}={module}"
    )


def check_path(dotted: str, kinds: str | Sequence[str] | None = None) -> None:
    """Refuse ``dotted`` before anything is imported unless its module is trusted for ``kinds``.

    Raises:
        UntrustedComponent: naming the path, the roles it could have filled and how to opt in.
    """
    ks = _kinds(kinds)
    if _under(dotted, trusted_modules()):
        return
    private = [p for p in dotted.split(".") if p.startswith("_")]
    if private:
        raise UntrustedComponent(
            f"{dotted!r}: private names ({', '.join(private)}) cannot be named in a file; "
            f"expected {_roles(ks)}"
        )
    roots = sorted({r for k in ks for r in _BUILTIN_ROOTS[k]})
    if not _under(dotted, roots):
        raise UntrustedComponent(
            f"{dotted!r} is not imported: a file may only name {_roles(ks)} from "
            f"{' or '.join(r + '.*' for r in roots)}; {_opt_in_hint(dotted)}"
        )


def check_object(obj: Any, dotted: str, kinds: str | Sequence[str] | None = None) -> None:
    """Refuse a resolved object that is not what its role builds; called before the object is called.

    Raises:
        UntrustedComponent: naming the path, what it is and what was expected.
    """
    ks = _kinds(kinds)
    if any(_fits(obj, k) for k in ks):
        return
    if callable(obj) and _under(str(getattr(obj, "__module__", None)), trusted_modules()):
        return  # defined in a module the user trusted (not merely imported there: `mymod.os.system` is refused)
    what = f"class {obj.__module__}.{obj.__qualname__}" if inspect.isclass(obj) else type(obj).__name__
    raise UntrustedComponent(f"{dotted!r} is a {what}, not {_roles(ks)}; it was not called")


def _fits(obj: Any, kind: str) -> bool:
    if kind == "method":
        from promptlab.prompts import PromptModule

        return inspect.isclass(obj) and issubclass(obj, PromptModule)
    if kind in ("optimizer", "scheduler"):
        import torch

        bases: tuple[type, ...] = (
            (torch.optim.Optimizer,)
            if kind == "optimizer"
            else (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        )
        return inspect.isclass(obj) and issubclass(obj, bases)
    return any(obj is fn for fn in _REGISTERED[kind])
