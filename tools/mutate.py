"""Mutation testing one module at a time, each against only its own test files (README: Development).

    python tools/mutate.py TARGET [MUTANT_GLOB ...]   # e.g. metrics, or metrics "*aupro*"
    python tools/mutate.py --list                      # the targets, their modules and test files

Why a wrapper around ``mutmut run``: mutmut first runs its whole test selection once to learn which
tests reach which function; with every module's tests in one selection that first pass alone takes
most of an hour here, and a metrics mutant would also run the engine tests that happen to call
``accuracy``. Each target below gets its own mutmut work folder ``.mutmut/TARGET/`` (git-ignored):
symlinks to the package, tests, datasets and recipes, and a ``pyproject.toml`` whose ``[tool.mutmut]``
is the repository's with this target's modules and tests. mutmut's cache lives there, so re-running a
target re-tests only the functions that changed. Inspect afterwards with mutmut itself:
``cd .mutmut/TARGET && mutmut results`` / ``mutmut show NAME``.

It runs ``nice``'d with one child process: the team's machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    "kgcoop": (["promptlab/methods/kgcoop.py"], ["tests/test_kgcoop.py", "tests/test_methods.py"]),
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
    "features": (["promptlab/features.py"], ["tests/test_engine.py"]),
    "anomaly": (
        ["promptlab/anomaly/method.py"],
        ["tests/test_anomaly.py", "tests/test_anomaly_parity.py"],
    ),
    "engine": (
        ["promptlab/engine.py"],
        [
            "tests/test_engine.py",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS), help="the module group to mutate")
    parser.add_argument("mutants", nargs="*", help="mutant names or globs, e.g. '*aupro*' (default: all)")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    args = parser.parse_args(argv)
    if args.list or not args.target:
        for name, (modules, tests) in TARGETS.items():
            print(f"{name:13} {' '.join(modules)}\n{'':13} tests: {' '.join(tests)}")
        return 0
    folder = work_folder(args.target)
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the mutated copy must be the one imported
    patterns = [m if "*" in m or m.startswith("promptlab.") else f"*{m}*" for m in args.mutants]
    cmd = ["nice", "-n", "15", str(mutmut), "run", "--max-children", "1", *patterns]
    code = subprocess.call(cmd, cwd=folder, env=env)
    if code == 0:
        subprocess.call([str(mutmut), "results"], cwd=folder, env=env)
    return code


if __name__ == "__main__":
    sys.exit(main())
