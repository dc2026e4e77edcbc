"""Benchmark: how long CLI commands that need no model take, against ``python -c "import torch"``.

Commands that only read recipes (``--help``, ``ls``, ``cp``, ``sweep --dry-run``) import neither torch
nor open_clip; ``sweep --dry-run --check`` also checks every job's method and optimizer arguments, which
imports torch (their signatures) but no CLIP library for a sandbox recipe. Each command runs in a fresh interpreter,
``--repeat`` times (the median is kept), interleaved with ``import torch`` in the same run, so the
ratios hold on a loaded machine even when the seconds do not.

    python benchmarks/bench_cli_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRY = "import sys; from promptlab.cli import main; sys.exit(main(sys.argv[1:]))"


def commands(tmp: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-c", ENTRY]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "promptlab --help": [*cli, "--help"],
        "promptlab ls": [*cli, "ls"],
        "promptlab cp": [*cli, "cp", "--force", "sandbox/coop_base2new", str(tmp / "copy.yaml")],
        "promptlab sweep sandbox/coop_base2new --dry-run": [
            *cli,
            "sweep",
            "sandbox/coop_base2new",
            "seeds=1,2,3",
            "--dry-run",
            "--out",
            str(tmp / "sweep"),
        ],
        "promptlab sweep sandbox/coop_base2new --dry-run --check": [
            *cli,
            "sweep",
            "sandbox/coop_base2new",
            "seeds=1,2,3",
            "--dry-run",
            "--check",
            "--out",
            str(tmp / "sweep"),
        ],
    }


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp))
        for argv in cmds.values():  # warm the file cache once
            timed(argv)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.repeat):
            for name, argv in cmds.items():
                times[name].append(timed(argv))
    median = {name: statistics.median(t) for name, t in times.items()}
    torch_s = median['python -c "import torch"']
    print(f"{'command':50} {'seconds':>8} {'x import torch':>15}")
    for name, s in median.items():
        print(f"{name:50} {s:8.2f} {s / torch_s:15.2f}")


if __name__ == "__main__":
    main()
