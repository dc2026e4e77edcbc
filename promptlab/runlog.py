"""What long jobs leave in their run directory besides results: ``log.txt`` and TensorBoard scalars,
and how loops show progress.

Shared by every run of :mod:`promptlab.runner` (anomaly detection included) and the sandbox
pretraining, so every kind of job can be followed (``tail -f log.txt``, ``tensorboard --logdir``)
the same way.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

LOG_FILE = "log.txt"
TB_DIR = "tb"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Seconds between the plain progress lines of a long loop whose output is not a terminal.
PLAIN_EVERY = 60.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Can ``stream`` (default stderr) redraw a line in place: is it a terminal?"""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    initial: int = 0,
    leave: bool = True,
    plain_lines: bool = True,
) -> Iterator[T]:
    """``iterable`` with a tqdm bar on a terminal; elsewhere (a pipe, a file, a sweep job's log) no bar.

    tqdm redraws with ``\\r`` and moves between nested bars with cursor escapes (``ESC[A``), which a
    file keeps as garbage. Off a terminal a loop instead logs a plain ``desc: i/total`` line at most
    every :data:`PLAIN_EVERY` seconds (none with ``plain_lines=False``: loops that log each step).
    """
    if is_terminal() or "ipykernel" in sys.modules:  # a terminal, or a notebook: tqdm.auto draws a widget
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, disable=total == 0)
        return
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)  # type: ignore[arg-type]
    start = last = time.monotonic()
    for i, item in enumerate(iterable, initial + 1):
        yield item
        now = time.monotonic()
        if plain_lines and now - last >= PLAIN_EVERY:
            last = now
            log.info("%s: %d/%s (%.0f s)", desc, i, total if total is not None else "?", now - start)


def file_logging(run_dir: Path) -> logging.Handler:
    """Copy the ``promptlab`` loggers' INFO records to ``run_dir/log.txt`` (appended: a resumed run
    keeps its history); the caller removes the returned handler with :func:`close_file_logging`."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger("promptlab").addHandler(handler)
    logging.getLogger("promptlab").setLevel(logging.INFO)
    return handler


def close_file_logging(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("promptlab").removeHandler(handler)
        handler.close()


def record_failure(handler: logging.Handler | None, exc: BaseException) -> None:
    """Write why a run stopped, with its traceback, to ``log.txt`` only (the console gets one line from the CLI)."""
    if handler is None:
        return
    record = logging.LogRecord(
        "promptlab", logging.ERROR, __file__, 0, "run failed: %s: %s", (type(exc).__name__, exc), None
    )
    record.exc_info = (type(exc), exc, exc.__traceback__)
    handler.handle(record)


@contextmanager
def run_log(run_dir: Path) -> Iterator[Any]:
    """``log.txt`` for the duration, and a TensorBoard ``SummaryWriter`` on ``run_dir/tb`` to log scalars to."""
    from torch.utils.tensorboard import SummaryWriter

    handler = file_logging(run_dir)
    writer = SummaryWriter(str(Path(run_dir) / TB_DIR))
    try:
        yield writer
    finally:
        writer.close()
        close_file_logging(handler)
