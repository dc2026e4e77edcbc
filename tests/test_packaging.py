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
