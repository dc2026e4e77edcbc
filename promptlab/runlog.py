"""What long jobs leave in their run directory besides results: ``log.txt`` and TensorBoard scalars.

Shared by prompt-learning runs (:mod:`promptlab.runner`), the anomaly loop and the sandbox
pretraining, so every kind of job can be followed (``tail -f log.txt``, ``tensorboard --logdir``)
the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_FILE = "log.txt"
TB_DIR = "tb"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
