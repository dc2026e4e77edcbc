"""``benchmarks/gpu.sh`` must work the first time a GPU is lent, so what can be checked without one is
checked here: it exits cleanly without CUDA, every step it lists names a benchmark whose parser takes
the step's options, and ``--device`` / ``--precision`` refuse what the machine cannot run."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptlab.cli import main as promptlab_main

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_SH = BENCH / "gpu.sh"


def _gpu_sh(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, env=env, timeout=120)


def test_gpu_sh_without_cuda_says_so_and_exits_0(tmp_path):
    res = _gpu_sh(tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "no CUDA device visible to torch" in res.stdout
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_gpu_sh_without_torch_fails_with_the_fix(tmp_path):
    python = tmp_path / "python-without-site-packages"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "PYTHONPATH": ""}
    res = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "cannot import torch" in res.stderr


def _steps(tmp_path: Path) -> list[tuple[str, int, list[str]]]:
    res = _gpu_sh("--list", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    steps = []
    for line in res.stdout.splitlines():
        label, limit, cmd = line.split("|")
        steps.append((label, int(limit), shlex.split(cmd)))
    return steps


class _Parsed(Exception):
    """Raised right after a benchmark's arguments parse: the step's options are valid, nothing ran."""


def _load(script: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(f"_promptlab_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_every_gpu_step_is_a_benchmark_that_takes_its_options(tmp_path, monkeypatch):
    """Each step's options parse in its benchmark (an unknown option or precision would exit 2), the
    sandbox step is a valid sweep, and the limits add up to at most 10 minutes."""
    steps = _steps(tmp_path)
    assert {label.split()[0] for label, _, _ in steps} >= {
        "coop-text",
        "cocoop",
        "coop-run",
        "memory",
        "eval",
        "exact-step",
    }
    assert {"fp32", "bf16", "fp16"} <= {label.split()[-1] for label, _, _ in steps}
    assert sum(limit for _, limit, _ in steps) <= 600
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.syspath_prepend(str(BENCH.parent / "tests"))
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    for label, _, argv in steps:
        if argv[1:3] == ["-m", "promptlab.cli"]:
            assert promptlab_main([*argv[3:], "--dry-run"]) == 0, label
            continue
        script = BENCH.parent / argv[1]
        assert script.is_file(), label
        module = _load(script, monkeypatch)
        monkeypatch.setattr(sys, "argv", [str(script), *argv[2:]])
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            module.main()
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)


def test_runtime_refuses_what_the_machine_cannot_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    common = _load(BENCH / "common.py", monkeypatch)
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        common.runtime(argparse.Namespace(device="cuda", precision="fp32"))
    with pytest.raises(SystemExit, match="pure fp16"):
        common.runtime(argparse.Namespace(device="cpu", precision="fp16"))
    rt = common.runtime(argparse.Namespace(device="cpu", precision="bf16"))
    assert rt.model_precision == "fp32"  # bf16 is autocast over fp32 weights, not a weight dtype
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fp32 = common.runtime(argparse.Namespace(device="cpu", precision="fp32"))
    with fp32.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert fp32.tolerance < rt.tolerance and fp32.grad_atol < rt.grad_atol
