"""Resumable, verified downloads for `promptlab data prepare` (standard library only: no torch).

A download is written to ``<name>.part`` beside its destination. An interrupted one (a dropped
connection, a killed process) keeps its ``.part``; the next attempt asks the server for the rest
with an HTTP Range request and appends, or starts over when the server ignores the range. Only a
file whose checksum matches is renamed to its final name, so a file under its final name is always
complete; a mismatch removes the ``.part`` (its bytes cannot be trusted) and raises
`ChecksumError` naming the file, the URL and both digests.

Google Drive (where CoOp's split files live) answers large files with an HTML "virus scan" page
instead of the bytes; `direct_url` turns a share link into the direct download endpoint, and a
web page arriving where a file was expected is an error rather than a saved file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20
USER_AGENT = "promptlab-data-prepare"
GDRIVE_DIRECT = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
_GDRIVE_ID = re.compile(r"drive\.google\.com/(?:file/d/|open\?id=|uc\?(?:[^#]*&)?id=)([\w-]+)")


class DownloadError(OSError):
    """A file could not be fetched (HTTP error, a web page instead of the file, too many retries)."""


class ChecksumError(DownloadError):
    """The bytes fetched (or placed by hand) do not match the published checksum."""


def gdrive(file_id: str) -> str:
    """The direct download URL of a public Google Drive file."""
    return GDRIVE_DIRECT.format(id=file_id)


def direct_url(url: str) -> str:
    """A Google Drive share link (``/file/d/ID/view``, ``open?id=ID``) as its direct download URL;
    any other URL unchanged. Lets users paste the links of CoOp's DATASETS.md as overrides."""
    m = _GDRIVE_ID.search(url)
    return gdrive(m.group(1)) if m and "usercontent" not in url else url


def file_md5(path: Path) -> str:
    """MD5 hex digest of a file, read in chunks (archives are tens of GB)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, md5: str | None, source: str, name: str | None = None) -> None:
    """Raise `ChecksumError` when `path` does not have the MD5 `md5` (None: nothing to check);
    the message calls the file `name` (default: its own name) and says it came from `source`."""
    if md5 is None:
        return
    got = file_md5(path)
    if got != md5.lower():
        raise ChecksumError(
            f"{name or path.name} from {source}: MD5 {got} does not match the published {md5}: the file is "
            "corrupt or not the expected file (a moved link, a mirror serving something else)"
        )


class _Progress:
    """Bytes so far on stderr: a tqdm bar on a terminal, a line every 10% elsewhere (logs, pipes)."""

    def __init__(self, name: str, total: int | None, initial: int) -> None:
        self.name, self.total, self.done = name, total, initial
        self.bar = None
        self.next_report = 0.1
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self.next_report:
            print(
                f"  {self.name}: {self.done / self.total:.0%} of {self.total / 1e6:.1f} MB", file=sys.stderr
            )
            self.next_report = (int(self.done / self.total * 10) + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Dropped(DownloadError):
    """The connection failed or closed early: the next attempt resumes from the ``.part``."""


def _request(url: str, start: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (URLs from our table or the user)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part already holds every byte the server has
            return None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Dropped(f"{url}: {getattr(e, 'reason', e)}") from e


def _fetch_once(url: str, part: Path, name: str, timeout: float) -> None:
    """One HTTP request appending to `part` from its current size."""
    start = part.stat().st_size if part.exists() else 0
    resp = _request(url, start, timeout)
    if resp is None:
        return
    with resp:
        if resp.status == 200 and start:  # the server ignored the Range header: start over
            start = 0
        ctype = resp.headers.get("Content-Type", "")
        if ctype.startswith("text/html") and not name.endswith((".html", ".htm")):
            raise DownloadError(
                f"{url} returned a web page, not {name} (a moved link, a login page or a download quota)"
            )
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        progress = _Progress(name, total, start)
        try:
            with open(part, "ab" if start else "wb") as f:
                while block := resp.read(CHUNK):
                    f.write(block)
                    progress.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise _Dropped(f"{url}: {e}") from e
        finally:
            progress.close()
    if total is not None and part.stat().st_size < total:
        raise _Dropped(f"{url}: connection closed after {part.stat().st_size} of {total} bytes")


def download(
    url: str, dest: Path, *, md5: str | None = None, retries: int = 3, timeout: float = 60.0
) -> Path:
    """Fetch `url` to `dest` through ``dest.part``: resume, verify, then rename.

    Args:
        url: http(s) URL (a Google Drive share link is turned into its direct download URL).
        dest: the final file; written only once the new file verifies.
        md5: expected MD5 (None where nobody publishes one: the dataset check validates instead).
        retries: further attempts after a dropped connection, each resuming where the last stopped.
        timeout: seconds without data before an attempt counts as dropped.

    Raises:
        DownloadError: HTTP error, a web page instead of the file, or still incomplete after the
            retries (the ``.part`` is kept: the next run resumes it).
        ChecksumError: the complete file does not match `md5` (its ``.part`` is removed).
    """
    url = direct_url(url)
    if not url.startswith(("https://", "http://")):  # file:// or ftp:// from a shared YAML: refused
        raise DownloadError(f"{url}: only http(s) URLs are fetched")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        if part.exists():
            print(f"  {dest.name}: resuming after {part.stat().st_size} bytes", file=sys.stderr)
        try:
            _fetch_once(url, part, dest.name, timeout)
            break
        except _Dropped as e:
            if attempt == retries:
                raise DownloadError(f"{e} (gave up after {retries + 1} attempts; rerun to resume)") from e
            print(f"  {dest.name}: {e}", file=sys.stderr)
            time.sleep(min(0.5 * 2**attempt, 5.0))
    try:
        verify(part, md5, url, dest.name)
    except ChecksumError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest
