"""A wheel carries datasets/ and recipes/, and the package finds them in a checkout and when installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from promptlab.resources import FOLDERS, resource_dir

REPO = Path(__file__).resolve().parents[1]


def test_every_yaml_folder_is_installed_by_the_wheel() -> None:
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for name in FOLDERS:
        for folder in {p.parent for p in (REPO / name).rglob("*.yaml")}:
            rel = folder.relative_to(REPO).as_posix()
            assert data_files.get(f"share/promptlab/{rel}") == [f"{rel}/*.yaml"], (
                f"pyproject.toml data-files lacks {rel}"
            )


def test_checkout_folders_are_used_in_place() -> None:
    assert resource_dir("datasets") == REPO / "datasets" and resource_dir("recipes") == REPO / "recipes"


def test_installed_package_uses_the_shared_copy_not_its_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In site-packages the package's parent holds other distributions (e.g. Hugging Face `datasets`)."""
    site = tmp_path / "site-packages"
    (site / "promptlab").mkdir(parents=True)
    (site / "datasets").mkdir()  # someone else's package
    share = tmp_path / "prefix" / "share" / "promptlab" / "datasets"
    share.mkdir(parents=True)
    monkeypatch.setattr(
        "promptlab.resources._installed_candidates",
        lambda name: [tmp_path / "prefix" / "share" / "promptlab" / name],
    )
    assert resource_dir("datasets", package_root=site / "promptlab") == share
    with pytest.raises(ValueError, match="unknown resource folder"):
        resource_dir("weights")


def test_import_promptlab_then_methods_as_the_docstring_shows() -> None:
    """`import promptlab` then `promptlab.methods.CoOp` works, and the methods load only when first used."""
    import subprocess
    import sys

    code = (
        "import sys, promptlab; loaded = 'promptlab.methods' in sys.modules; "
        "print(loaded, promptlab.methods.CoOp.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "CoOp"]


def test_readme_python_snippet_classifies_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block runs as written: only the backbone, run folder and image file are swapped."""
    import re

    from PIL import Image

    import promptlab
    from promptlab.export import save_prompts
    from promptlab.methods import CoOp

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    clip = promptlab.load_clip("sandbox")
    save_prompts(CoOp(clip, ["red circle", "blue square"], n_ctx=4), tmp_path / "run" / "prompts")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(promptlab, "load_clip", lambda *a, **k: clip)
    block = re.sub(r'^run = "[^"]+"', 'run = "run"', block, flags=re.M)
    printed: list[str] = []
    exec(compile(block, "README.md", "exec"), {"print": printed.append})  # noqa: S102 - our own README
    assert printed and printed[0] in ("red circle", "blue square")


def test_distribution_name_is_not_the_unrelated_pypi_promptlab() -> None:
    """`promptlab` on PyPI is an LLM prompt tool: the distribution is `promptlab-clip` (free when
    chosen: `pip index versions promptlab-clip` found nothing), the import name and command stay."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "promptlab-clip"
    assert project["scripts"] == {"promptlab": "promptlab.cli:main"}
    assert "distribution is named `promptlab-clip`" in (REPO / "README.md").read_text()
