"""End to end through the CLI: the demo recipe on the tiny CLIP and generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from promptlab.cli import main
from promptlab.resources import RECIPES_DIR, list_recipes


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run shared by the tests below (train 3 epochs, evaluate, export)."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    args = ["run", f"output_dir={out}", f"cache_dir={tmp / 'cache'}", "train.epochs=3"]
    assert main(args) == 0
    return tmp, out


def test_run_writes_everything(demo_run):
    _, out = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "synthetic" and metrics["n"] > 0 and 0 <= metrics["accuracy"] <= 100
    assert metrics["train"]["epochs"] == 3 and len(metrics["weights_fingerprint"]) == 16
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert "epoch 3/3" in (out / "log.txt").read_text()
    assert any((out / "tb").iterdir())
    cfg = json.loads((out / "prompts" / "prompt_config.json").read_text())
    assert cfg["method"] == "coop" and cfg["hparams"]["ctx_init"] == "a photo of a"
    assert set(load_file(out / "prompts" / "prompts.safetensors")) == {"ctx"}


def test_resume_of_a_finished_run_reproduces_its_metrics(demo_run, tmp_path):
    tmp, out = demo_run
    before = json.loads((out / "metrics.json").read_text())
    assert (
        main(["run", f"output_dir={out}", f"cache_dir={tmp / 'cache'}", "train.epochs=3", "resume=true"]) == 0
    )
    after = json.loads((out / "metrics.json").read_text())
    assert after["train"]["resumed_from_epoch"] == 3
    assert after["accuracy"] == before["accuracy"]


def test_eval_on_new_classes_and_from_prompts_dir(demo_run, capsys):
    tmp, out = demo_run
    assert main(["eval", str(out), "subsample=new"]) == 0
    res = json.loads((out / "eval_synthetic_new_test.json").read_text())
    assert res["subsample"] == "new" and res["n"] > 0
    root = tmp / "cache" / "data"
    assert main(["eval", str(out / "prompts"), f"data.root={root}", "data.name=synthetic"]) == 0
    same = json.loads((out / "prompts" / "eval_synthetic_all_test.json").read_text())
    run_metrics = json.loads((out / "metrics.json").read_text())
    assert same["accuracy"] == pytest.approx(run_metrics["accuracy"])


def test_export_and_interpret(demo_run, tmp_path, capsys):
    _, out = demo_run
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    a = load_file(out / "prompts" / "prompts.safetensors")["ctx"]
    b = load_file(tmp_path / "exp" / "prompts.safetensors")["ctx"]
    assert (a == b).all()
    capsys.readouterr()
    assert main(["interpret", str(tmp_path / "exp"), "--topk", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("\n") >= 4  # one row per context vector (4 from "a photo of a") + header


def test_ls_and_cp(tmp_path, capsys):
    assert main(["ls"]) == 0
    listed = capsys.readouterr().out.split()
    assert "fewshot/coop_vit_b16" in listed and listed == list_recipes()
    assert main(["cp", "fewshot/coop_vit_b16", str(tmp_path)]) == 0
    assert (tmp_path / "coop_vit_b16.yaml").is_file()
    assert main(["cp", "fewshot/coop_vit_b16", str(tmp_path)]) == 3  # exists, no --force


def test_bad_override_names_the_key(capsys):
    assert main(["run", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch" in err and "epochs" in err


def test_missing_data_root_names_the_key(tmp_path, capsys):
    code = main(
        [
            "run",
            "fewshot/coop_vit_b16",
            f"data.root={tmp_path / 'nope'}",
            "model.arch=tiny",
            "model.pretrained=null",
        ]
    )
    assert code == 2 and "data.root" in capsys.readouterr().err


def test_profile_prints_where_time_goes(tmp_path, capsys):
    args = [
        "run",
        "--profile",
        "2",
        f"output_dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}",
        "train.epochs=2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out  # torch.profiler's operator table


def test_run_dispatches_a_pretrain_recipe(monkeypatch) -> None:
    """`promptlab run` on a `kind: pretrain` recipe hands it to the sandbox pretraining, overrides included."""
    import promptlab.sandbox.pretrain as pretrain

    seen = []
    monkeypatch.setattr(pretrain, "main", lambda argv: seen.append(argv))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sandbox" / "pretrain.yaml"
    assert main(["run", str(recipe), "steps=3"]) == 0
    assert seen == [[str(recipe), "steps=3"]]


def test_run_applies_the_recipes_per_dataset_section(tmp_path):
    """`promptlab run` trains with the recipe's per-dataset values for the dataset it runs on."""
    recipe = yaml.safe_load((RECIPES_DIR / "demo" / "coop_tiny.yaml").read_text())
    recipe["per_dataset"] = {"synthetic": {"train": {"epochs": 2}}, "imagenet": {"train": {"epochs": 50}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(path), f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["epochs"] == 2
    assert "epoch 2/2" in (out / "log.txt").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2


def test_run_refuses_an_n_ctx_that_ctx_init_overrides(tmp_path, capsys):
    """`method.n_ctx=8` beside `ctx_init: a photo of a` (4 tokens) would be silently ignored: refused, named."""
    out = tmp_path / "run"
    args = ["run", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "train.epochs=1", "method.n_ctx=8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "method.n_ctx" in err and "n_ctx=4" in err
    assert not (out / "metrics.json").exists() and not (out / "prompts").exists()


def test_interpret_accepts_a_run_directory(demo_run, capsys):
    """`interpret RUN_DIR` reads RUN_DIR/prompts, as `eval` and `load_prompts` do."""
    _, out = demo_run
    capsys.readouterr()
    assert main(["interpret", str(out), "--topk", "2"]) == 0
    assert "unified context: nearest words (L2)" in capsys.readouterr().out


# ---------------------------------------------------------------------- commands that need no model
_NO_MODEL = ("torch", "open_clip", "transformers", "torchvision")


def _modules_after(code: str, tmp_path: Path) -> dict:
    """Run ``code`` (which calls promptlab.cli.main) in a fresh interpreter; report the heavy imports."""
    import subprocess
    import sys

    probe = (
        "import json, sys, contextlib, io\nfrom promptlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + f"print(json.dumps({{m: m in sys.modules for m in {_NO_MODEL!r}}}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_help_ls_cp_import_no_model_library(tmp_path):
    """`--help`, `ls`, `cp` and every sub-command's --help answer without importing torch (seconds)."""
    code = "\n".join(
        [
            "for argv in (['--help'], ['sweep', '--help'], ['data', '--help'], ['import', '--help']):",
            "    try:",
            "        main(argv)",
            "    except SystemExit:",
            "        pass",
            "assert main(['ls']) == 0",
            "assert main(['cp', 'sandbox/coop_base2new', 'copy.yaml']) == 0",
        ]
    )
    assert _modules_after(code, tmp_path) == dict.fromkeys(_NO_MODEL, False)
    assert (tmp_path / "copy.yaml").is_file()


def test_dry_run_imports_no_model_library(tmp_path):
    """`sweep --dry-run` lists the plan without torch; `--dry-run --check` imports torch (the method's
    and optimizer's signatures) but still no CLIP library for a sandbox recipe."""
    out = str(tmp_path / "s")
    code = f"assert main(['sweep', 'sandbox/coop_base2new', 'seeds=1', '--dry-run', '--out', {out!r}]) == 0"
    assert _modules_after(code, tmp_path) == dict.fromkeys(_NO_MODEL, False)
    code = code.replace("'--dry-run'", "'--dry-run', '--check'")
    loaded = _modules_after(code, tmp_path)
    assert loaded == {"torch": True, "open_clip": False, "transformers": False, "torchvision": False}


def test_dry_run_without_check_still_refuses_untrusted_and_unknown_keys(tmp_path, capsys):
    """The torch-free dry run keeps the checks that need no import: the trust rule and the schema.
    A wrong method argument is caught by --check, and by the sweep before any run starts."""

    def sweep(override: str, *options: str) -> int:
        return main(
            ["sweep", "sandbox/coop_base2new", "seeds=1", override, "--out", str(tmp_path / "s"), *options]
        )

    assert sweep("method._component_=os.system", "--dry-run") == 2
    assert "os.system" in capsys.readouterr().err
    assert sweep("train.epoks=3", "--dry-run") == 2
    assert "train.epoks" in capsys.readouterr().err
    assert sweep("method.n_ctxx=3", "--dry-run") == 0  # arguments are not checked without --check
    assert "checked when the sweep starts" in capsys.readouterr().err
    assert sweep("method.n_ctxx=3", "--dry-run", "--check") == 2
    assert "n_ctxx" in capsys.readouterr().err
    assert sweep("method.n_ctxx=3") == 2  # the real sweep checks before anything runs
    assert "n_ctxx" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_import_sources_listed_in_the_parser_are_the_importers():
    from promptlab.cli import IMPORT_SOURCES
    from promptlab.importers import SOURCES

    assert IMPORT_SOURCES == tuple(SOURCES)


def test_unknown_recipe_exits_2_with_suggestions(capsys):
    """A recipe that is not found is a bad recipe like any other: exit 2, with the closest names."""
    assert main(["run", "fewshot/coop_vit_b1"]) == 2
    err = capsys.readouterr().err
    assert "promptlab: error: recipe 'fewshot/coop_vit_b1' not found" in err
    assert "did you mean 'fewshot/coop_vit_b16'" in err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.arch=sandbx", "model.arch: 'sandbx' is not a known architecture (did you mean 'sandbox'?)"),
        ("model.arch=tiyn", "(did you mean 'tiny'?)"),
        ("model.arch=vit-b-16", "did you mean 'ViT-B-16'"),
        ("data.name=synthetc", "error: unknown dataset 'synthetc' (did you mean 'synthetic'?)"),
    ],
)
def test_bad_names_fail_before_any_data_is_made(tmp_path, capsys, override, expected):
    """The demo generates its images under data.root; a bad name must stop it before that."""
    root = tmp_path / "data"
    argv = ["run", f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path}", f"data.root={root}", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and '"' not in err  # no stray quotes around the message
    assert not root.exists() and not (tmp_path / "run").exists()
