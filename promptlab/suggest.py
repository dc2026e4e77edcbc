"""``did you mean ...?`` for names given by the user (recipe keys, datasets, architectures, tags)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: object, choices: Iterable[object], n: int = 3) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the choices closest to ``word``, or ``""`` if none is close.

    Case is ignored when matching (``vit-b-16`` finds ``ViT-B-16``); the choices are named as spelled.
    """
    by_lower: dict[str, str] = {}
    for c in choices:
        by_lower.setdefault(str(c).lower(), str(c))
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(by_lower[c]) for c in close)}?)" if close else ""
