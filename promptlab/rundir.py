"""A run directory describes exactly one run: one writer at a time, and a config that matches its files.

:func:`claim_run_dir` is called before a run writes anything. It

1. takes the directory's lock (``.promptlab.lock``: an ``flock`` held for the whole run, with the
   holder's pid, host and start time in the file for the message a second run gets). The kernel
   drops the lock when its process dies, even by ``kill -9``, so a stale lock file never blocks;
2. removes the temporary files an interrupted atomic write left behind (``.last.pt.1a2b3c4d.tmp``);
3. refuses a directory that already holds a run unless this run continues it (``resume=true`` with
   the same configuration, compared key by key) or the user asked to replace it (``--overwrite``,
   which first removes the old run's outputs);
4. only then writes ``config.yaml``, atomically, so the config on disk is always the one that
   produced the checkpoint and metrics beside it.

``promptlab sweep`` takes the same lock on its output directory, so two sweeps never run one grid twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "IGNORED_KEYS",
    "LOCK_FILE",
    "RunClaim",
    "RunDirError",
    "claim_run_dir",
    "config_conflicts",
    "lock_dir",
    "remove_stale_temporaries",
]

LOCK_FILE = ".promptlab.lock"
CONFIG_FILE = "config.yaml"
# Keys that may differ between a run directory's config.yaml and a new run without changing results.
IGNORED_KEYS = frozenset(
    {
        "resume",
        "output_dir",
        "cache_dir",
        "device",
        "data.root",
        "data.num_workers",
        "train.log_every",
        "train.profile_steps",
    }
)
# Sections that only say where a run is scheduled (partition, time, GPUs): never a different run.
IGNORED_SECTIONS = ("launcher",)
# What a run leaves in its directory; a file among these means "a run is here". --overwrite removes all.
_RUN_EVIDENCE = ("metrics.json", "checkpoints/last.pt", "prompts/prompt_config.json")
_RUN_OUTPUTS = ("config.yaml", "metrics.json", "log.txt", "checkpoints", "prompts", "tb", "backbone")
_STAGED = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # promptlab.io.stage's temporary names


class RunDirError(RuntimeError):
    """The run directory is in use, or holds another run; the message says what to do."""


class RunClaim:
    """The lock on a run directory; :meth:`release` it when the run ends (it is released on exit anyway)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # nobody holds it now
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunClaim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_dir(directory: Path, what: str = "run") -> RunClaim:
    """Take ``directory``'s lock without waiting.

    Raises:
        RunDirError: another process holds it; the message names its pid, host and start time.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output directory {directory} is a file; choose a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented)
        return RunClaim(path, None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(
            f"{directory} is in use by another {what} ({_holder(path)}); wait for it to finish or choose "
            "another output directory"
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return RunClaim(path, fd)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left (only call under the lock)."""
    removed = []
    for p in Path(directory).rglob(".*.tmp"):
        if _STAGED.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info(
            "removed %d leftover temporary file(s) of an interrupted write in %s", len(removed), directory
        )
    return removed


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_conflicts(saved: Path, cfg: DictConfig) -> list[str]:
    """``key: old -> new`` for each key whose value in ``saved`` (a config.yaml) differs from ``cfg``."""
    old = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(set(old) | set(new), key=str)
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if k not in IGNORED_KEYS
        and k.split(".")[0] not in IGNORED_SECTIONS
        and old.get(k) != new.get(k)
        and not (k not in old and _added_at_default(k, new.get(k)))
    ]


def _added_at_default(key: str, value: Any) -> bool:
    """A key the saved config lacks, now at its schema default: added to the schema since, same run."""
    from promptlab.config import schema_default

    return schema_default(key.split(".")) == value


def _check_existing(run_dir: Path, cfg: DictConfig, overwrite: bool) -> None:
    evidence = [e for e in _RUN_EVIDENCE if (run_dir / e).exists()]
    if not evidence:
        return  # nothing on disk that a config could contradict
    if overwrite:
        for name in _RUN_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for p in run_dir.glob("eval_*.json"):
            p.unlink()
        log.info("--overwrite: removed the previous run's outputs from %s", run_dir)
        return
    state = "finished" if "metrics.json" in evidence else "interrupted"
    if not bool(cfg.get("resume", False)):
        raise RunDirError(
            f"{run_dir} already holds a {state} run; pass --overwrite to replace it, resume=true to "
            "continue it with the same configuration, or choose another output_dir"
        )
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise RunDirError(
            f"{run_dir} holds a {state} run ({', '.join(evidence)}) but no {CONFIG_FILE}, so resume=true cannot "
            "check it is the same run; pass --overwrite to replace it"
        )
    conflicts = config_conflicts(saved, cfg)
    if conflicts:
        raise RunDirError(
            f"resume=true: {run_dir} holds a {state} run of a different configuration ({'; '.join(conflicts)}); "
            "resume continues the same configuration only: pass --overwrite to replace it or choose another "
            "output_dir"
        )


def claim_run_dir(run_dir: Path, cfg: DictConfig, *, overwrite: bool = False) -> RunClaim:
    """Lock ``run_dir``, clean it, check it may take this run, then write ``config.yaml`` (see the module doc).

    Raises:
        RunDirError: the directory is busy or holds another run (nothing was written or removed).
        OSError: the directory cannot be written; the previous config.yaml is left as it was.
    """
    from promptlab.io import atomic_write_bytes  # here: `promptlab sweep --help` must not import torch

    run_dir = Path(run_dir)
    claim = lock_dir(run_dir)
    try:
        remove_stale_temporaries(run_dir)
        _check_existing(run_dir, cfg, overwrite)
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg).encode("utf-8"))
    except BaseException:
        claim.release()
        raise
    return claim
