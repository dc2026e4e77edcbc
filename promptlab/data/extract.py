"""Extract downloaded archives as hostile input: nothing outside the destination, nothing half-done.

Every member name is checked before a byte is written: absolute paths, ``..`` components and
drive letters are refused, and so is every member that is not a plain file or a folder (symbolic
and hard links, devices, FIFOs): none of the datasets' archives contain one, and a link is how an
archive writes outside its folder. Files are written by copying their bytes, so permission bits,
owners and timestamps from the archive are not applied either.

The archive is first extracted into a hidden scratch folder beside the destination; only when the
whole archive has been read does `extract` move the wanted parts into place (renames on one file
system). A truncated or corrupt archive therefore raises `ArchiveError` and leaves the dataset
folder as it was.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive is corrupt, truncated, of an unknown format, or holds a member we refuse."""


def _safe_name(label: str, name: str) -> PurePosixPath:
    """The member's relative path, or ArchiveError for a name that would leave the folder."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if not norm or p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ArchiveError(f"{label}: refusing member {name!r}: its path leaves the extraction folder")
    return PurePosixPath(*[part for part in p.parts if part not in ("", ".")])


Member = tuple[PurePosixPath, bool, IO[bytes] | None]  # relative path, is a folder, its bytes


def _tar_members(tf: tarfile.TarFile, label: str) -> Iterator[Member]:
    for m in tf:
        if not (m.isfile() or m.isdir()):
            raise ArchiveError(
                f"{label}: refusing member {m.name!r}: links and special files are not extracted"
            )
        rel = _safe_name(label, m.name)
        yield rel, m.isdir(), (None if m.isdir() else tf.extractfile(m))


def _members(archive: Path) -> Iterator[Member]:
    """Each member of a zip or tar archive, after the safety checks."""
    if archive.suffix.lower() == ".zip":  # by name: a compressed tar can contain zip-like bytes
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ArchiveError(f"{archive.name}: refusing link member {info.filename!r}")
                rel = _safe_name(archive.name, info.filename)
                if info.is_dir():
                    yield rel, True, None
                else:
                    with z.open(info) as f:
                        yield rel, False, f
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{archive.name}: not a readable tar or zip archive ({e})") from e
    with tf:
        yield from _tar_members(tf, archive.name)


def _write(members: Iterator[Member], into: Path, label: str) -> None:
    """Write `members` under `into` (a scratch folder), bytes only (no modes, owners, times)."""
    try:
        for rel, is_dir, f in members:
            target = into.joinpath(*rel.parts)
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                shutil.copyfileobj(f, out, CHUNK)
    except ArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions: not the archive
            raise
        raise ArchiveError(f"{label}: corrupt or truncated archive ({type(e).__name__}: {e})") from e


def unpack_all(archive: Path, into: Path) -> None:
    """Extract every member of `archive` under `into` (a scratch folder), with the checks above."""
    _write(_members(archive), into, archive.name)


def unpack_class_tars(archive: Path, into: Path) -> None:
    """ILSVRC-2012's train archive: a tar of one tar per class (``n01440764.tar``), written as
    ``into/n01440764/*.JPEG``. Streamed: the inner tars are never written to disk (138 GB, not 276)."""

    def members() -> Iterator[Member]:
        for rel, is_dir, f in _members(archive):
            if is_dir:
                continue
            if rel.suffix != ".tar" or len(rel.parts) != 1:
                raise ArchiveError(f"{archive.name}: expected one tar per class, found {rel.as_posix()!r}")
            label = f"{archive.name}:{rel.name}"
            with tarfile.open(fileobj=f, mode="r:") as inner:
                for sub, sub_dir, g in _tar_members(inner, label):
                    yield PurePosixPath(rel.stem, *sub.parts), sub_dir, g

    _write(members(), into, archive.name)


def merge_into(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; where both are folders, merge (files of `src` replace those of `dst`)."""
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            merge_into(child, dst / child.name)
        src.rmdir()
        return
    if dst.is_dir():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


@contextmanager
def scratch_dir(beside: Path, tag: str) -> Iterator[Path]:
    """A hidden folder in `beside` (same file system as the destination), removed on exit, with
    `beside` itself when this created it and it stayed empty."""
    created = not beside.exists()
    beside.mkdir(parents=True, exist_ok=True)
    tmp = beside / f".{tag}.extracting"
    if tmp.exists():  # left by a killed run
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(beside.iterdir()):
            beside.rmdir()


def extract(archive: Path, dest: Path, moves: Mapping[str, str]) -> list[Path]:
    """Extract `archive`, then move its parts into `dest` as `moves` says.

    Args:
        archive: a .tar, .tar.gz/.tgz or .zip file.
        dest: the folder the parts go to (created if needed).
        moves: path inside the archive ("." for all of it) -> path under `dest` ("." for `dest`
            itself); e.g. ``{"fgvc-aircraft-2013b/data": "."}``.

    Returns:
        The destinations written.

    Raises:
        ArchiveError: corrupt archive, refused member, or a part of `moves` missing from it;
            `dest` is then untouched.
    """
    with scratch_dir(dest.parent, f"{dest.name}-{archive.name}") as tmp:
        unpack_all(archive, tmp)
        sources = {rel: tmp / rel for rel in moves}
        missing = [rel for rel, path in sources.items() if not path.exists()]
        if missing:
            top = sorted(p.name for p in tmp.iterdir())
            raise ArchiveError(
                f"{archive.name}: expected {missing} inside the archive, found top-level entries {top} "
                "(not the expected archive, or its layout changed)"
            )
        written = []
        for rel, target in moves.items():
            out = dest if target == "." else dest / target
            merge_into(sources[rel], out)
            written.append(out)
    return written
