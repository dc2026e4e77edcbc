"""``promptlab sweep``: the command line over :mod:`promptlab.sweep` (local runs) and
:mod:`promptlab.launchers` (Slurm), in its own module so that the launchers, which build on the
sweep's plan and jobs, are not imported by the module they import (no import circle).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from promptlab.sweep import JOB_LOG, _list, format_plan, plan_sweep, profile_table, run_sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from promptlab.resources import find_recipes

    if args.status:
        from promptlab.launchers import cmd_status

        return cmd_status(args.status)
    if not args.recipe:
        raise ValueError("sweep: give a RECIPE to run, or --status DIR")
    # every bare word is a recipe (or a pattern of recipe names); key=value words are sweep keys and overrides
    names = [args.recipe, *(a for a in args.args if "=" not in a)]
    overrides = [a for a in args.args if "=" in a]
    recipes = list(dict.fromkeys(p for name in names for p in find_recipes(name)))
    check = not args.dry_run or args.check
    several = len(recipes) > 1
    if args.launcher == "slurm":
        from promptlab.launchers import launcher_overrides, slurm_sweep

        if several:
            raise ValueError("sweep --launcher slurm takes one recipe; submit each recipe's sweep on its own")
        own = [*overrides, *launcher_overrides(args)]
        sweep = plan_sweep(recipes[0], own, args.out, check_components=check)
        return slurm_sweep(sweep, dry_run=args.dry_run, wait_for=args.wait, every=args.progress_every)
    out, under = (None, args.out) if several else (args.out, None)
    sweeps = [plan_sweep(r, overrides, out, check_components=check, under=under) for r in recipes]
    clash = [o for o, n in Counter(str(sw.out) for sw in sweeps).items() if n > 1]
    if clash:
        raise ValueError(f"sweep: two recipes would share the sweep directory {clash[0]}; sweep them apart")
    devices = _list(args.devices) if args.devices else None
    t0 = time.perf_counter()
    result = run_sweep(
        sweeps,
        jobs=args.jobs,
        devices=devices,
        in_process=args.in_process,
        dry_run=args.dry_run,
        progress_every=args.progress_every,
    )
    if args.dry_run:
        for sweep in sweeps:
            print(f"{sweep.protocol} sweep of {sweep.recipe} into {sweep.out}")
        print(format_plan(result))
        if not check:
            print(
                "method, optimizer and backbone arguments are checked when the sweep starts, before any "
                "run (--check checks them now; it imports torch)",
                file=sys.stderr,
            )
        return 0
    wall = time.perf_counter() - t0
    if result.failed:
        print(f"{len(result.failed)} of {len(result.ran)} runs failed:", file=sys.stderr)
        for job in result.failed:
            print(f"  {job.run_dir} (log: {Path(job.run_dir) / JOB_LOG})", file=sys.stderr)
        return 1
    outs = [sw.out for sw in sweeps]
    print(
        f"{len(result.ran)} runs done, {len(result.statuses) - len(result.ran)} skipped -> {', '.join(map(str, outs))}"
    )
    extra = {"sweep wall time": wall}
    if several:  # the comparison the sweeps of several recipes are run for: one table, plot and tau
        from promptlab.report import compare_sweeps, write_report

        t = time.perf_counter()
        for d in outs:
            write_report(d, None, None)
        parent = Path(args.out) if args.out else Path(os.path.commonpath([d.resolve() for d in outs]))
        rep = compare_sweeps(outs, parent / "comparison")
        extra["report"] = time.perf_counter() - t
        print(rep.markdown.read_text())
        print(f"written: {rep.markdown}, {rep.csv}" + (f", {rep.plot}" if rep.plot else ""))
    else:
        print(f"tables and plots: promptlab report {outs[0]}")
    if args.profile:
        print(profile_table([job for sw in sweeps for job in sw.jobs], result.seconds, extra))
    return 0


def add_sweep_command(sub: Any) -> None:
    """Register ``promptlab sweep`` on the CLI's subparsers."""
    s = sub.add_parser(
        "sweep", help="run a protocol's grid (datasets x shots x seeds) from a recipe: resumable, parallel"
    )
    s.add_argument(
        "recipe",
        nargs="?",
        help="recipe path or name under recipes/; a pattern ('sandbox/*_base2new') names several",
    )
    s.add_argument(
        "args",
        nargs="*",
        metavar="[RECIPE ...] key=value",
        help="more recipes (several: their jobs share the slots, then one comparison table, plot and "
        "Kendall tau), then protocol=base2new|fewshot|crossdataset datasets=all|a,b seeds=1,2,3 "
        "shots=1,2,4,8,16 targets=all|a,b (crossdataset), and any recipe override (applied to every recipe)",
    )
    s.add_argument(
        "--out",
        help="sweep directory (default runs/sweeps/<recipe>-<protocol>); with several recipes, the folder "
        "that holds each one's <recipe>-<protocol> and the comparison/",
    )
    s.add_argument(
        "--profile",
        action="store_true",
        help="at the end, print where the time went: seconds per recipe and phase (startup, data generation, "
        "setup, feature encoding, training, evaluation) and the report's",
    )
    s.add_argument(
        "--jobs", type=int, help="runs side by side, one process each (default: one per device, or 1)"
    )
    s.add_argument(
        "--devices", help="GPU ids, e.g. 0,1,2,3: each job process sees one (CUDA_VISIBLE_DEVICES)"
    )
    s.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    s.add_argument(
        "--check",
        action="store_true",
        help="with --dry-run: also import the method, optimizer and backbone to check their arguments (slower)",
    )
    s.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between progress lines when the output is not a terminal (default 60; a "
        "terminal gets one line redrawn in place)",
    )
    s.add_argument(
        "--in-process", action="store_true", help="run the jobs one by one in this process (debugging)"
    )
    _add_launcher_arguments(s)
    s.set_defaults(func=cmd_sweep)


def _add_launcher_arguments(s: argparse.ArgumentParser) -> None:
    """``--launcher slurm`` and its resources (promptlab.launchers; each overrides the recipe's ``launcher.*``)."""
    s.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: child processes here (default); slurm: one sbatch job per run through submitit",
    )
    s.add_argument("--status", metavar="DIR", help="pending / running / done / failed of each run of a sweep")
    g = s.add_argument_group("slurm (override the recipe's launcher: section)")
    g.add_argument("--partition")
    g.add_argument("--time", type=int, metavar="MINUTES", help="time limit per job")
    g.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs per job; more than 1 runs torchrun")
    g.add_argument("--cpus-per-job", type=int, metavar="N")
    g.add_argument("--mem", metavar="SIZE", help="memory per job, e.g. 32G")
    g.add_argument(
        "--sbatch",
        action="append",
        metavar="NAME[=VALUE]",
        help="any other sbatch option, e.g. --sbatch qos=high --sbatch exclusive (repeatable)",
    )
    g.add_argument("--wait", action="store_true", help="wait for the jobs, then exit 0 if all are done")
