"""Mutation testing one module at a time, each against only its own test files (README: Development).

    python tools/mutate.py TARGET [MUTANT_GLOB ...]   # e.g. metrics, or metrics "*aupro*"
    python tools/mutate.py --list                      # the targets, their modules and test files
    python tools/mutate.py --in-process TARGET [GLOB ...] [--tests FILE_OR_NODE ...]

Why a wrapper around ``mutmut run``: mutmut first runs its whole test selection once to learn which
tests reach which function; with every module's tests in one selection that first pass alone takes
most of an hour here, and a metrics mutant would also run the engine tests that happen to call
``accuracy``. Each target below gets its own mutmut work folder ``.mutmut/TARGET/`` (git-ignored):
symlinks to the package, tests, datasets and recipes, and a ``pyproject.toml`` whose ``[tool.mutmut]``
is the repository's with this target's modules and tests. mutmut's cache lives there, so re-running a
target re-tests only the functions that changed. Inspect afterwards with mutmut itself:
``cd .mutmut/TARGET && mutmut results`` / ``mutmut show NAME``.

It runs ``nice``'d with one child process: the team's machine is shared.

``--in-process``: the same mutants (mutmut generates them; its trampolines read ``MUTANT_UNDER_TEST``
at call time), run by one Python process that imports torch and the tests once and calls
``pytest.main`` per mutant, instead of mutmut's stats pass over every test file plus a fresh test
session per mutant. The verdicts go into mutmut's own ``.meta`` files, so ``mutmut results`` / ``show``
work as after ``mutmut run``. ``--tests`` narrows the test selection (a mutant that survives a narrow
selection must be re-run with the target's full one before it is called a survivor). What one process
shares across mutants: module-level values computed at import (under the clean code, as mutmut's
fork server also has them) and module globals; ``functools`` caches of the mutated package are
cleared before each mutant, and the clean selection is run before the first mutant and after the last:
if the second clean run fails, a mutant left state behind and the verdicts are not to be trusted.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# target -> (modules mutated, test files that pin them). Method targets list every test file that
# constructs the method; a test elsewhere that happens to call it does not count as pinning it.
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "metrics": (["promptlab/metrics.py"], ["tests/test_metrics.py"]),
    "fewshot": (["promptlab/data/fewshot.py"], ["tests/data/test_data_fewshot.py"]),
    "coop": (
        ["promptlab/methods/coop.py", "promptlab/methods/zeroshot.py"],
        ["tests/test_methods.py", "tests/test_coop_parity.py", "tests/test_precision.py"],
    ),
    "cocoop": (["promptlab/methods/cocoop.py"], ["tests/test_methods.py", "tests/test_cocoop_parity.py"]),
    "kgcoop": (  # with the knowledge-guided loss KgCoOp and TCP share
        ["promptlab/methods/kgcoop.py", "promptlab/methods/knowledge.py"],
        ["tests/test_kgcoop.py", "tests/test_methods.py", "tests/test_tcp_parity.py"],
    ),
    "deep": (
        ["promptlab/methods/ivlp.py", "promptlab/methods/maple.py"],
        ["tests/test_methods.py", "tests/test_deep_prompts.py"],
    ),
    "mocoop": (["promptlab/methods/mocoop.py"], ["tests/test_mocoop.py", "tests/test_mocoop_parity.py"]),
    "vificlip": (
        ["promptlab/methods/vificlip.py"],
        ["tests/test_video_vificlip.py", "tests/test_methods.py"],
    ),
    "tcp": (["promptlab/methods/tcp.py"], ["tests/test_tcp_parity.py", "tests/test_methods.py"]),
    "prograd": (
        ["promptlab/methods/prograd.py"],
        ["tests/test_prograd_parity.py", "tests/test_methods.py", "tests/test_training_hooks.py"],
    ),
    "promptsrc": (
        ["promptlab/methods/promptsrc.py"],
        ["tests/test_promptsrc_parity.py", "tests/test_methods.py", "tests/test_training_hooks.py"],
    ),
    "adapters": (
        [
            "promptlab/methods/clip_adapter.py",
            "promptlab/methods/tip_adapter.py",
            "promptlab/methods/gda.py",
            "promptlab/methods/linear_probe.py",
        ],
        ["tests/test_adapters_parity.py", "tests/test_fit_contract.py", "tests/test_methods.py"],
    ),
    "clip_lora": (
        ["promptlab/methods/clip_lora.py"],
        ["tests/test_clip_lora_parity.py", "tests/test_methods.py"],
    ),
    "methods_init": (["promptlab/methods/__init__.py"], ["tests/test_methods.py", "tests/test_config.py"]),
    "prompts": (
        ["promptlab/prompts.py"],
        [
            "tests/test_prefix.py",
            "tests/test_methods.py",
            "tests/test_precision.py",
            "tests/test_coop_parity.py",
            "tests/test_cocoop_parity.py",
            "tests/test_deep_prompts.py",
            "tests/test_kgcoop.py",
            "tests/test_backbone_families.py",
            "tests/test_prompt_maths.py",
        ],
    ),
    "features": (["promptlab/features.py"], ["tests/test_engine.py", "tests/test_decoded_images.py"]),
    "anomaly": (
        ["promptlab/anomaly/method.py"],
        ["tests/test_anomaly.py", "tests/test_anomaly_parity.py"],
    ),
    "engine": (
        ["promptlab/engine.py"],
        [
            "tests/test_schedules.py",
            "tests/test_training_state.py",
            "tests/test_engine.py",
            "tests/test_train_loop.py",
            "tests/test_ddp.py",
            "tests/test_image_side_training.py",
            "tests/test_tasks.py",
            "tests/test_training_hooks.py",
            "tests/test_fit_contract.py",
            "tests/test_adapters_parity.py",
        ],
    ),
}

# what the tests need besides the package itself (mutmut copies these into its mutants/ folder)
LINKED = ["promptlab", "tests", "datasets", "recipes", "setup.cfg"]


def _toml_value(value: object) -> str:
    """Strings, booleans, numbers and lists of them; JSON's spelling of these is valid TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def work_folder(target: str) -> Path:
    """Create (or refresh) ``.mutmut/TARGET`` with its links and mutmut configuration."""
    modules, tests = TARGETS[target]
    for path in modules + tests:
        if not (ROOT / path).is_file():
            raise SystemExit(f"tools/mutate.py: {target}: {path} does not exist (update TARGETS)")
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    conf = {**base, "only_mutate": modules, "pytest_add_cli_args_test_selection": tests}
    folder = ROOT / ".mutmut" / target
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", name))
    text = "[tool.mutmut]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in conf.items())
    config = folder / "pyproject.toml"
    if not config.exists() or config.read_text() != text:  # an unchanged file keeps mutmut's cache
        config.write_text(text)
    return folder


# ---------------------------------------------------------------------- --in-process
# mutmut's exit codes for its .meta files (mutmut.stats.status_by_exit_code)
EXIT_CODE = {"killed": 1, "survived": 0, "timeout": 36, "crash": -11}

# Run in the work folder: mutmut 3.8's own generation steps (what ``mutmut run`` does before its
# stats pass), and nothing else. Internal API: pinned by the mutmut version in pyproject.toml's test extras.
_GENERATE = """
import os
from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths,
                             store_lines_covered_by_tests)
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests(); create_mutants(1)
"""


def function_of(mutant: str) -> str:
    """``promptlab.engine.x_lr_at__mutmut_3`` -> ``lr_at``; ``...xǁFeatureBatchesǁ__iter____mutmut_2`` ->
    ``FeatureBatches.__iter__`` (the row of the survivor table a mutant counts in)."""
    key = mutant.rpartition("__mutmut_")[0].rpartition(".")[2]
    if key.startswith("x\u01c1"):  # mutmut's class separator
        cls, _, method = key[2:].partition("\u01c1")
        return f"{cls}.{method}"
    return key[2:] if key.startswith("x_") else key


def select_mutants(names: Iterable[str], patterns: list[str]) -> list[str]:
    """The names matching any pattern (fnmatch, as ``mutmut run`` filters); all of them without patterns."""
    return [n for n in names if not patterns or any(n == p or fnmatch.fnmatch(n, p) for p in patterns)]


def meta_files(folder: Path, modules: list[str]) -> list[Path]:
    return [folder / "mutants" / f"{m}.meta" for m in modules]


def record(meta: Path, results: list[dict]) -> int:
    """Write verdicts into mutmut's ``.meta`` file (exit codes and durations), so that ``mutmut results``
    and ``mutmut show`` see them; results of mutants of other files are left out. Returns how many."""
    data = json.loads(meta.read_text())
    n = 0
    for r in results:
        if r["name"] in data["exit_code_by_key"]:
            data["exit_code_by_key"][r["name"]] = EXIT_CODE.get(r["status"], r.get("rc", 35))
            data["durations_by_key"][r["name"]] = r["seconds"]
            n += 1
    meta.write_text(json.dumps(data, indent=4))
    return n


def summary(results: list[dict]) -> str:
    """Per function: mutants, killed, survived, timeouts and others; then the survivors by name."""
    columns = ("mutants", "killed", "survived", "timeout", "other")
    rows: dict[str, dict[str, int]] = {}
    for r in results:
        row = rows.setdefault(function_of(r["name"]), dict.fromkeys(columns, 0))
        row["mutants"] += 1
        # a crashed test process caught the mutant; "suspicious" (pytest's usage errors, no tests) did not
        status = {"crash": "killed"}.get(r["status"], r["status"])
        row[status if status in columns else "other"] += 1
    width = max([len("function"), *map(len, rows)])
    lines = [f"{'function':{width}}  " + "  ".join(columns)]
    lines += [
        f"{f:{width}}  " + "  ".join(f"{row[c]:{len(c)}}" for c in columns) for f, row in sorted(rows.items())
    ]
    survivors = [r["name"] for r in results if r["status"] == "survived"]
    lines += ["", f"{len(survivors)} survived" + (":" if survivors else "")] + [f"  {n}" for n in survivors]
    return "\n".join(lines)


class _MutantTimeout(Exception):
    """Raised into the running test by SIGALRM: the mutant's tests ran past their limit."""


def _worker(job_file: str) -> int:
    """Inside ``mutants/``: run the job's test selection once clean, then once per mutant, appending one
    JSON line per event to the job's results file; the parent restarts it after a crash or a hang."""
    job = json.loads(Path(job_file).read_text())
    sys.path.insert(0, os.getcwd())  # the mutated copy, before the editable install of the package
    import importlib

    import pytest

    for module in job["modules"]:
        mod = importlib.import_module(module.removesuffix(".py").replace("/", "."))
        if not Path(mod.__file__).resolve().is_relative_to(Path.cwd().resolve()):
            raise SystemExit(f"tools/mutate.py: {module} imported from {mod.__file__}, not the mutated copy")
    args = [
        "--rootdir=.",
        "--tb=short",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        *job["tests"],
    ]
    packages = {m.split("/")[0] for m in job["modules"]}
    out = open(job["results"], "a")  # noqa: SIM115 - one line per event, flushed, for the parent

    def emit(**event: object) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    def run(name: str, limit: float) -> tuple[int, float, bool]:
        for mod in list(sys.modules.values()):  # functools caches must not carry one mutant's values on
            if getattr(mod, "__name__", "").split(".")[0] in packages:
                for value in list(vars(mod).values()):
                    if callable(getattr(value, "cache_clear", None)):
                        value.cache_clear()
        os.environ["MUTANT_UNDER_TEST"] = name
        fired = []

        def alarm(*_: object) -> None:
            fired.append(True)
            raise _MutantTimeout(f"{name}: past {limit:.0f} s")

        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        t0 = time.perf_counter()
        try:
            rc = int(pytest.main(args))
        except _MutantTimeout:  # fired in pytest's own code, between tests
            rc = 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return rc, time.perf_counter() - t0, bool(fired)

    limit = job["timeout"]
    if job["clean_first"]:
        rc, seconds, _ = run("", 10 * limit)
        emit(clean="before", rc=rc, seconds=seconds)
        if rc != 0:
            return 1
        limit = limit or (seconds + 20) * 5
    for name in job["names"]:
        emit(start=name, limit=limit)
        rc, seconds, timed_out = run(name, limit)
        status = "timeout" if timed_out else {0: "survived", 1: "killed", 3: "killed"}.get(rc, "suspicious")
        emit(name=name, status=status, rc=rc, seconds=round(seconds, 2))
        print(f"{status:9} {seconds:6.1f} s  {name}", file=sys.stderr, flush=True)
    rc, seconds, _ = run("", 10 * limit)
    emit(clean="after", rc=rc, seconds=seconds)
    return 0


def run_in_process(target: str, patterns: list[str], tests: list[str], timeout: float) -> int:
    """Generate the target's mutants with mutmut, run them in one worker process, record and summarise."""
    folder = work_folder(target)
    modules, target_tests = TARGETS[target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the mutated copy must be the one imported
    nice = ["nice", "-n", "15"]
    gen = subprocess.run(
        [*nice, sys.executable, "-c", _GENERATE], cwd=folder, env=env, capture_output=True, text=True
    )
    if gen.returncode != 0:  # mutmut lists every file it copies: shown only when generation fails
        print(gen.stdout, gen.stderr, file=sys.stderr)
        return gen.returncode
    names = [
        n for meta in meta_files(folder, modules) for n in json.loads(meta.read_text())["exit_code_by_key"]
    ]
    todo = select_mutants(names, patterns)
    if not todo:
        raise SystemExit(f"tools/mutate.py: no mutant of {target} matches {patterns}")
    results_file = folder / "in-process.jsonl"
    results_file.write_text("")
    log_file = folder / "in-process.log"
    print(f"{len(todo)} mutants; pytest output in {log_file}", flush=True)
    results: list[dict] = []
    clean_first, limit = True, timeout
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        while True:
            job = {
                "modules": modules,
                "tests": tests or target_tests,
                "names": todo,
                "timeout": limit,
                "clean_first": clean_first,
                "results": str(results_file),
            }
            (folder / "in-process-job.json").write_text(json.dumps(job))
            cmd = [
                *nice,
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                str(folder / "in-process-job.json"),
            ]
            proc = subprocess.Popen(cmd, cwd=folder / "mutants", env=env, stdout=log, stderr=sys.stderr)
            started: tuple[str, float] | None = None
            seen = 0
            while proc.poll() is None:
                time.sleep(1)
                events = [json.loads(line) for line in results_file.read_text().splitlines()[seen:]]
                seen += len(events)
                for e in events:
                    if "start" in e:
                        started, limit = (e["start"], time.monotonic()), e["limit"]
                    elif "name" in e:
                        started = None
                if (
                    started and time.monotonic() - started[1] > limit + 120
                ):  # stuck where SIGALRM cannot reach
                    proc.kill()
                    proc.wait()
            events = [json.loads(line) for line in results_file.read_text().splitlines()]
            clean = [e for e in events if e.get("clean") == "before"]
            if not clean or clean[0]["rc"] != 0:
                print(f"the clean test run failed or never ran: see {log_file}", file=sys.stderr)
                return 1
            results = [e for e in events if "name" in e]
            done = {r["name"] for r in results}
            todo = [n for n in todo if n not in done]
            if not todo:
                break
            # the worker died or hung on todo[0]: a mutant that crashes the process or never ends is caught
            status = "timeout" if proc.returncode in (-9, 137) else "crash"
            with open(results_file, "a") as f:
                f.write(
                    json.dumps({"name": todo[0], "status": status, "rc": proc.returncode, "seconds": 0})
                    + "\n"
                )
            todo, clean_first, limit = todo[1:], False, limit or 600.0
            if not todo:
                break
    results = [json.loads(line) for line in results_file.read_text().splitlines()]
    clean_after = [e for e in results if e.get("clean") == "after"]
    results = [e for e in results if "name" in e]
    for meta in meta_files(folder, modules):
        record(meta, results)
    print(summary(results))
    elapsed = time.perf_counter() - t0
    print(f"{len(results)} mutants in {elapsed:.0f} s ({elapsed / max(1, len(results)):.1f} s each)")
    if not clean_after or clean_after[-1]["rc"] != 0:
        print(
            "WARNING: the clean run after the mutants failed: a mutant left state behind; re-check with mutmut"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS), help="the module group to mutate")
    parser.add_argument("mutants", nargs="*", help="mutant names or globs, e.g. '*aupro*' (default: all)")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--in-process", action="store_true", help="one test process for all mutants (fast)")
    parser.add_argument("--tests", nargs="+", default=[], help="--in-process: test files or node ids to run")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="--in-process: seconds per mutant (default: from the clean run)",
    )
    args = parser.parse_args(argv)
    if args.list or not args.target:
        for name, (modules, tests) in TARGETS.items():
            print(f"{name:13} {' '.join(modules)}\n{'':13} tests: {' '.join(tests)}")
        return 0
    patterns = [m if "*" in m or m.startswith("promptlab.") else f"*{m}*" for m in args.mutants]
    if args.in_process:
        return run_in_process(args.target, patterns, args.tests, args.timeout)
    folder = work_folder(args.target)
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the mutated copy must be the one imported
    cmd = ["nice", "-n", "15", str(mutmut), "run", "--max-children", "1", *patterns]
    code = subprocess.call(cmd, cwd=folder, env=env)
    if code == 0:
        subprocess.call([str(mutmut), "results"], cwd=folder, env=env)
    return code


if __name__ == "__main__":
    sys.exit(main())
