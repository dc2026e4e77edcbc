"""Where a run's wall time goes: exclusive seconds per phase, recorded in ``metrics.json`` (``timing_s``).

A sweep's ``--profile`` sums them over its runs (see :func:`promptlab.sweep.profile_table`): the
answer to "where do the minutes go" (data generation, feature encoding, training, evaluation)
without a profiler. Phases nest: a feature encoding inside the training phase counts as
``features``, not ``train``, so the phases of a run add up to its wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The phases the runner records, in the order a run goes through them.
PHASES = ("data", "setup", "features", "train", "eval")

_totals: dict[str, float] = {}
_stack: list[list] = []  # [name, start, seconds spent in nested phases]


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's wall time as ``name``, less the time of phases nested in it."""
    _stack.append([name, time.perf_counter(), 0.0])
    try:
        yield
    finally:
        _, start, nested = _stack.pop()
        elapsed = time.perf_counter() - start
        _totals[name] = _totals.get(name, 0.0) + elapsed - nested
        if _stack:
            _stack[-1][2] += elapsed


def reset() -> None:
    """Forget the phases recorded so far (a new run or job starts)."""
    _totals.clear()


def take() -> dict[str, float]:
    """The seconds per phase since the last :func:`reset` / :func:`take`, rounded; then reset."""
    out = {k: round(v, 3) for k, v in _totals.items()}
    _totals.clear()
    return out
