"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Checkpoints, exports and metrics are written to a temporary file in the *same directory* (so the
final rename never crosses a filesystem), flushed and fsynced, then moved over the target with
``os.replace``, which is atomic on POSIX and Windows. The directory is fsynced afterwards so the
rename itself survives a power cut. A failure at any point removes the temporary file and leaves
the previous version of the target untouched.

Writers of several files that must change together (a prompt export) stage every file first with
:func:`stage` and only then :func:`commit` them, so nothing is replaced before everything is
written.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: the CLI's --help / ls / cp import this module without it
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "atomic_save_safetensors",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "commit",
    "discard",
    "stage",
]


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry is data of the directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a complete, fsynced temporary file beside ``path`` without touching ``path``.

    Args:
        path: the file the data is meant for; its directory is created if needed.
        write: called with a binary file object open on the temporary file.

    Returns:
        The temporary file, to be moved into place with :func:`commit` (or removed with :func:`discard`).

    The temporary name starts with a dot and ends in ``.tmp`` so that listings and globs for the
    real files (``model.pth.tar-*``) never pick it up. It is created with mode 0o666 minus the
    umask, like any file ``open`` would create, not with ``mkstemp``'s private 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard(tmp)
        raise
    return tmp


def commit(tmp: str | Path, path: str | Path) -> Path:
    """Move a staged file over ``path`` atomically and make the rename durable."""
    path = Path(path)
    try:
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def discard(tmp: str | Path) -> None:
    """Remove a staged file; quiet when it is already gone."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(file)`` so that it is replaced only once complete."""
    return commit(stage(path, write), path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically: an interrupted save never corrupts the last checkpoint.

    Raises:
        OSError: the file could not be written (torch reports a full disk as a RuntimeError from its
            zip writer, "inline_container.cc"; it is re-raised as an OSError naming ``path``).
    """
    try:
        import torch

        return atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        raise OSError(f"cannot write {path}: disk full or not writable ({first})") from e


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) atomically.

    The text is serialised before any file is created, so an object that is not JSON-serialisable
    raises ``TypeError`` without leaving anything behind.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise tensors to safetensors bytes, copying them to contiguous, unshared CPU memory.

    safetensors refuses non-contiguous tensors and tensors that share storage (views of one
    parameter, tied weights); an explicit copy of each makes any state dict acceptable.
    """
    import torch
    from safetensors.torch import save

    plain = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return _canonical_safetensors(save(plain, metadata=dict(metadata) if metadata is not None else None))


def _canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted, so equal tensors give equal bytes.

    safetensors writes ``__metadata__`` from a Rust hash map whose order changes from call to call;
    the header is ``u64 length + JSON`` padded with spaces to 8 bytes, and the data offsets are
    relative to the end of the header, so rewriting it leaves the tensor bytes valid.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save tensors in safetensors format atomically (``metadata``: string keys and values only)."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
