"""Where promptlab's data folders live: ``datasets/`` (dataset YAMLs, template groups) and ``recipes/``,
and how a recipe is found by name (``fewshot/coop_vit_b16``).

They sit at the top of the source tree, beside the package, so that researchers edit them as files.
In a source checkout (the README's editable install) they are used in place; a wheel installs a
copy under ``<prefix>/share/promptlab/`` (``[tool.setuptools.data-files]`` in pyproject.toml).
A checkout is recognised by ``pyproject.toml`` beside the package: in site-packages the parent folder
is shared with every other distribution (Hugging Face's ``datasets`` package lives there too).
"""

from __future__ import annotations

import fnmatch
import sysconfig
from pathlib import Path

from promptlab.suggest import did_you_mean

PACKAGE_ROOT = Path(__file__).resolve().parent
FOLDERS = ("datasets", "recipes")


def _installed_candidates(name: str) -> list[Path]:
    """``<prefix>/share/promptlab/<name>`` for this environment's prefix, then for ``pip install --user``."""
    prefixes = [sysconfig.get_path("data")]
    try:
        prefixes.append(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user")))
    except KeyError:  # a platform without a user scheme
        pass
    return [Path(p) / "share" / "promptlab" / name for p in prefixes]


def resource_dir(name: str, package_root: Path = PACKAGE_ROOT) -> Path:
    """The ``datasets`` or ``recipes`` folder: the checkout's, else the installed copy.

    Raises:
        ValueError: ``name`` is not one of :data:`FOLDERS`.
    """
    if name not in FOLDERS:
        raise ValueError(f"unknown resource folder {name!r}; known: {FOLDERS}")
    checkout = package_root.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / name).is_dir():
        return checkout / name
    candidates = _installed_candidates(name)
    return next((p for p in candidates if p.is_dir()), candidates[0])


RECIPES_DIR = resource_dir("recipes")


def list_recipes() -> list[str]:
    """Every recipe under ``recipes/``, named as :func:`find_recipe` takes them (``sandbox/coop_base2new``)."""
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe path as given, or ``recipes/<name>[.yaml]``.

    Here rather than in the CLI so that ``sweep`` and ``anomaly`` find recipes without importing the
    CLI that registers them (no import circle).

    Raises:
        FileNotFoundError: with the closest recipe names; the CLI exits 2, as for any bad recipe.
    """
    for cand in (Path(name), RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"recipe {name!r} not found (as a path or under {RECIPES_DIR}){did_you_mean(name, list_recipes())}; "
        "`promptlab ls` lists them"
    )


def find_recipes(name: str) -> list[Path]:
    """:func:`find_recipe`, or for a pattern with ``*``, ``?`` or ``[`` (``sandbox/*_base2new``) every
    recipe name under ``recipes/`` it matches, sorted.

    Raises:
        FileNotFoundError: a pattern that matches no recipe, or a name :func:`find_recipe` does not find.
    """
    if not any(c in name for c in "*?["):
        return [find_recipe(name)]
    pattern = name[: -len(".yaml")] if name.endswith(".yaml") else name
    found = [n for n in list_recipes() if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        raise FileNotFoundError(f"no recipe under {RECIPES_DIR} matches {name!r}; `promptlab ls` lists them")
    return [RECIPES_DIR / f"{n}.yaml" for n in found]
