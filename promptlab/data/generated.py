"""Write-once bookkeeping for datasets that promptlab generates on disk (synthetic, sandbox).

A generator first checks :func:`up_to_date` (same arguments, every file there: nothing to do), else
calls :func:`begin` (forget the old arguments and index), renders its files, then calls
:func:`commit`, which writes the arguments and *last* the index files a reader needs (a split JSON,
clip lists). A crash part-way leaves no index and no arguments, so the next call starts over instead
of reading a half-written dataset, whatever arguments either call had.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from promptlab.data.items import dump_split_json
from promptlab.io import atomic_write_bytes

log = logging.getLogger(__name__)

PARAMS_FILE = "generator_params.json"


def _normalised(params: dict[str, Any]) -> Any:
    return json.loads(json.dumps(params))  # tuples -> lists, int keys -> str: compare as JSON would


def recorded_params(folder: Path) -> dict[str, Any] | None:
    """The arguments ``folder`` was last committed with, or None (never, or a generation was interrupted)."""
    params_path = Path(folder) / PARAMS_FILE
    try:
        return json.loads(params_path.read_text()) if params_path.is_file() else None
    except json.JSONDecodeError:
        return None


def up_to_date(folder: Path, params: dict[str, Any], index: Iterable[Path], files: Iterable[Path]) -> bool:
    """True when ``folder`` was committed with these ``params`` and every index file and data file exists."""
    return (
        recorded_params(folder) == _normalised(params)
        and all(p.is_file() for p in index)
        and all(p.is_file() for p in files)
    )


def begin(folder: Path, index: Iterable[Path]) -> None:
    """Forget the recorded arguments and the index before files are (re)written."""
    (Path(folder) / PARAMS_FILE).unlink(missing_ok=True)
    for path in index:
        Path(path).unlink(missing_ok=True)


def commit(folder: Path, params: dict[str, Any], index: dict[Path, str]) -> None:
    """Record ``params``, then write each index file atomically: the dataset becomes readable only now."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        Path(folder) / PARAMS_FILE, (json.dumps(_normalised(params), indent=1) + "\n").encode()
    )
    for path, text in index.items():
        atomic_write_bytes(Path(path), text.encode())


def write_split_dataset(
    folder: Path,
    split_file: str,
    classnames: Sequence[str],
    counts: dict[str, int],
    params: dict[str, Any],
    render: Callable[[str, str], Image.Image],
) -> Path:
    """Render a classification dataset in CoOp's split-file layout, unless it is already complete.

    Layout: ``folder/images/<class_with_underscores>/<split>_<i>.png`` and ``folder/<split_file>``.

    Args:
        folder: The dataset folder.
        split_file: The split JSON's file name (what the dataset YAML's ``split_file`` names).
        classnames: Class names in label order.
        counts: Images per class for each split, e.g. ``{"train": 16, "val": 4, "test": 30}``.
        params: Everything that determines the pixels (recorded; a change regenerates the folder).
        render: ``render(classname, relative_path)`` -> the image; it must be a pure function of
            its arguments so that a seed fixes every file.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    image_dir, split_path = folder / "images", folder / split_file
    split = {
        s: [
            [f"{c.replace(' ', '_')}/{s}_{i:03d}.png", y, c]
            for y, c in enumerate(classnames)
            for i in range(n)
        ]
        for s, n in counts.items()
    }
    files = [image_dir / row[0] for rows in split.values() for row in rows]
    params = {**params, "classnames": list(classnames), "counts": dict(counts)}
    if up_to_date(folder, params, [split_path], files):
        return folder
    begin(folder, [split_path])
    for rows in split.values():
        for rel, _, classname in rows:
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            render(classname, rel).save(image_dir / rel)
    commit(folder, params, {split_path: dump_split_json(split)})
    log.info("wrote %s (%d classes) to %s", split_file, len(classnames), folder)
    return folder


LOCK_FILE = ".promptlab-generate.lock"


@contextmanager
def generation_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root`` while generating into it.

    Processes that start together (torchrun ranks, ``promptlab sweep --jobs N``) would otherwise
    render the same files at the same time; with the lock the first one writes them and the others
    find them complete. Advisory ``flock`` (POSIX); elsewhere no lock is taken.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(root / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_generator(spec: dict[str, Any], root: Path, source: str = "generator") -> Any:
    """Call a dataset YAML's or recipe's ``generator:`` (``{_component_: dotted.path, **kwargs}``) as
    ``fn(root, **kwargs)`` under :func:`generation_lock`; generators skip work when complete.

    Raises:
        ValueError: the arguments do not fit the generator (a misspelt key); names ``source``.
    """
    import inspect

    from promptlab.components import ConfigError, resolve_component

    kwargs = dict(spec)
    try:  # only registered generators (or those of a module the user trusted) run
        fn = resolve_component(kwargs.pop("_component_", None), "generator")
    except ConfigError as e:
        raise ConfigError(e.reason, key="_component_", source=source) from None
    root = Path(root).expanduser()
    try:
        inspect.signature(fn).bind(root, **kwargs)
    except TypeError as e:
        known = [p for p in inspect.signature(fn).parameters][1:]
        raise ValueError(f"{source}: {e} (the generator {spec['_component_']} takes {known})") from None
    with generation_lock(root):
        return fn(root, **kwargs)
