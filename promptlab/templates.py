"""Hand-crafted prompt templates: the CLIP ImageNet ensembles, as data."""

from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."
_ENSEMBLES = {"imagenet80": "IMAGENET80", "imagenet7": "IMAGENET7", "promptsrc60": "PROMPTSRC60"}


def __getattr__(name: str) -> list[str]:
    """``IMAGENET80`` (CLIP's 80-prompt ImageNet ensemble) and ``IMAGENET7`` (the 7 its authors selected,
    CoOp's IMAGENET_TEMPLATES_SELECT) and ``PROMPTSRC60`` (PromptSRC's IMAGENET_TEMPLATES: the first 60 of
    the 80, "a photo of a {}." moved first, muzairkhattak/PromptSRC trainers/imagenet_templates.py), read
    from open_clip on first use: importing open_clip costs seconds, and a recipe check imports this
    module (through the methods) without needing them."""
    if name not in _ENSEMBLES.values():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    source = SIMPLE_IMAGENET_TEMPLATES if name == "IMAGENET7" else OPENAI_IMAGENET_TEMPLATES
    found = [t("{}") for t in source]
    return [found[39], *found[:39], *found[40:60]] if name == "PROMPTSRC60" else found


def resolve_templates(templates: str | list[str], dataset_template: str | None) -> list[str]:
    """``"dataset"`` (the dataset's own template), ``"imagenet80"``, ``"imagenet7"`` or an explicit list."""
    if isinstance(templates, str):
        if templates == "dataset":
            return [dataset_template or DEFAULT_TEMPLATE]
        if templates not in _ENSEMBLES:
            raise ValueError(
                f"templates={templates!r}: expected one of {sorted(['dataset', *_ENSEMBLES])} or a list of templates"
            )
        return __getattr__(_ENSEMBLES[templates])
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(
            f"templates: each template needs a '{{}}' for the class name; got {bad or templates}"
        )
    return list(templates)
