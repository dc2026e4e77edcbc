"""A user's own method, outside the package, through every verb: the README's "Write your own method" block.

The test runs that block line by line in a temporary folder, so the README and the story cannot
drift apart: ``promptlab`` lines through the CLI's ``main`` (sweep jobs still start their own
processes, which must find and trust the user's module through the environment), the
``python -c`` line in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from promptlab.cli import main
from promptlab.export import load_prompts, save_prompts

REPO = Path(__file__).resolve().parents[1]


def _readme_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Write your own method") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_user_method_story(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROMPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "mymethods", raising=False)
    seen = []
    for line in _readme_block():
        words = shlex.split(line, comments=True)
        seen.append(words[0])
        if words[0] == "cp":  # `cp a b && cp c d`
            for src, dst in re.findall(r"cp (\S+) (\S+)", line):
                shutil.copy(REPO / src, tmp_path / dst)
        elif words[0] == "export":
            for assignment in words[1:]:
                key, value = assignment.split("=", 1)
                if key == "PYTHONPATH":  # children: ".", then whatever made promptlab importable here
                    monkeypatch.setenv(key, os.pathsep.join(p for p in (value, os.environ.get(key)) if p))
                    monkeypatch.syspath_prepend(str(tmp_path))  # this process: the same "."
                else:
                    monkeypatch.setenv(key, value)
        elif words[0] == "promptlab":
            assert main(words[1:]) == 0, line
        elif words[0] == "python":
            out = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, check=True)
            assert out.stdout.startswith("TempCoOp("), out.stdout + out.stderr
        else:
            raise AssertionError(f"README line the test does not know how to run: {line}")
    assert seen == ["cp", "export", "promptlab", "promptlab", "promptlab", "python", "promptlab", "promptlab"]

    run = tmp_path / "runs" / "tempcoop" / "synthetic" / "shots4" / "seed1"
    new = json.loads((run / "eval_synthetic_new_test.json").read_text())
    assert new["subsample"] == "new" and new["n"] > 0
    cfg = json.loads((tmp_path / "tempcoop_prompts" / "prompt_config.json").read_text())
    assert cfg["method"] == "tempcoop" and cfg["component"] == "mymethods.TempCoOp"
    assert set(cfg["tensors"]) == {"ctx", "log_scale"}
    sweep = tmp_path / "runs" / "sweeps" / "tempcoop-base2new"
    report = (sweep / "report.md").read_text()
    assert "| synthetic | 1,2 |" in report
    for seed in (1, 2):  # the sweep's new-class half rebuilt the user's method in its own process
        assert (sweep / "synthetic" / "shots4" / f"seed{seed}" / "eval_synthetic_new_test.json").is_file()


def test_loading_a_users_method_needs_it_importable_and_trusted(
    tiny_clip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal names the module and says how to fix it; nothing from the file is imported untrusted."""
    (tmp_path / "labmethods.py").write_text((REPO / "examples" / "tempcoop.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "labmethods", raising=False)
    monkeypatch.delenv("PROMPTLAB_TRUSTED_MODULES", raising=False)
    import labmethods

    save_prompts(labmethods.TempCoOp(tiny_clip, ["cat", "dog"]), tmp_path / "p")
    del sys.modules["labmethods"]
    with pytest.raises(ValueError, match=r"labmethods.*--trust-module labmethods") as err:
        load_prompts(tmp_path / "p", tiny_clip)
    assert "prompt_config.json" in str(err.value) and "labmethods" not in sys.modules  # never imported

    monkeypatch.setenv("PROMPTLAB_TRUSTED_MODULES", "labmethods")
    module = load_prompts(tmp_path / "p", tiny_clip, ["cow"])
    assert type(module).__name__ == "TempCoOp" and module.classnames == ["cow"]

    cfg_path = tmp_path / "p" / "prompt_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "component": "labmethods_gone.TempCoOp"}))
    monkeypatch.setenv("PROMPTLAB_TRUSTED_MODULES", "labmethods_gone")
    with pytest.raises(
        ValueError, match=r"'labmethods_gone' must be importable \(run from its folder with PYTHONPATH"
    ):
        load_prompts(tmp_path / "p", tiny_clip)
