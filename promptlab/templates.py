"""Hand-crafted prompt templates: the CLIP ImageNet ensembles, as data."""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

#: The 80 prompts of CLIP's ImageNet zero-shot ensemble.
IMAGENET80: list[str] = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
#: The 7-prompt subset CLIP's authors selected (CoOp's IMAGENET_TEMPLATES_SELECT).
IMAGENET7: list[str] = [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]

DEFAULT_TEMPLATE = "a photo of a {}."


def resolve_templates(templates: str | list[str], dataset_template: str | None) -> list[str]:
    """``"dataset"`` (the dataset's own template), ``"imagenet80"``, ``"imagenet7"`` or an explicit list."""
    if isinstance(templates, str):
        named = {
            "dataset": [dataset_template or DEFAULT_TEMPLATE],
            "imagenet80": IMAGENET80,
            "imagenet7": IMAGENET7,
        }
        if templates not in named:
            raise ValueError(
                f"templates={templates!r}: expected one of {sorted(named)} or a list of templates"
            )
        return list(named[templates])
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(
            f"templates: each template needs a '{{}}' for the class name; got {bad or templates}"
        )
    return list(templates)
