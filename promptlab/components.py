"""``_component_`` paths: import the callable a recipe or dataset YAML names, if its role allows it.

Below the recipe schema (:mod:`promptlab.config`) and the data layer, which both name components
(methods and optimizers; dataset readers and generators), so neither imports the other for it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from promptlab import trust
from promptlab.suggest import did_you_mean

COMPONENT_KEY = "_component_"


class ConfigError(ValueError):
    """A recipe is invalid. The message names the recipe file and the key path (``train.epochs``)."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None) -> None:
        self.key, self.source, self.reason = key, source, message
        prefix = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def resolve_component(dotted: str, kind: str | Sequence[str] | None = None) -> Callable[..., Any]:
    """Import ``"pkg.mod.Name"`` (or ``"pkg.mod.Class.attr"``) and return the callable, if its role allows it.

    ``kind`` is the role of the node naming it (``method``, ``optimizer``, ``scheduler``,
    ``generator``, ``reader``; ``None``: any class role). Under :mod:`promptlab.trust`'s rule the path
    is checked before anything is imported and the object before it is returned, so nothing a file
    names is imported or called unless it is promptlab's (torch's optimizers) or the user trusted it.
    The longest importable module prefix is imported with importlib, the rest is read with getattr.
    A module that exists but fails to import (a bug in it, a missing dependency) is reported as such,
    not mistaken for a wrong path.

    Raises:
        ConfigError: naming ``dotted`` and why it could not be imported or is not allowed.
    """
    check_component_path(dotted, kind)
    try:
        obj = _import_dotted(dotted)
        trust.check_object(obj, dotted, kind)
    except trust.UntrustedComponent as e:
        raise ConfigError(str(e)) from None
    return obj


def check_component_path(dotted: Any, kind: str | Sequence[str] | None = None) -> None:
    """The import-free half of :func:`resolve_component`: ``dotted`` is well formed and trusted for ``kind``.

    Raises:
        ConfigError: naming ``dotted`` and why it is refused.
    """
    if not isinstance(dotted, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", dotted):
        raise ConfigError(f"_component_ must be a dotted path like 'pkg.module.Name', got {dotted!r}")
    try:
        trust.check_path(dotted, kind)
    except trust.UntrustedComponent as e:
        raise ConfigError(str(e)) from None


def _import_dotted(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this module does not exist" means: try a shorter prefix.
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue
            raise ConfigError(f"cannot import {dotted!r}: importing {module_name!r} failed: {e}") from e
        except Exception as e:  # any error while importing user code is reported
            raise ConfigError(
                f"cannot import {dotted!r}: importing {module_name!r} raised {type(e).__name__}: {e}"
            ) from e
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                owner = ".".join(parts[:j])
                public = sorted(n for n in dir(obj) if not n.startswith("_"))
                hint = did_you_mean(attr, public)
                raise ConfigError(f"cannot import {dotted!r}: {owner!r} has no attribute {attr!r}{hint}")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ConfigError(f"{dotted!r} is not callable (got {type(obj).__name__})")
        return obj
    raise ConfigError(f"cannot import {dotted!r}: no module named {parts[0]!r}")
