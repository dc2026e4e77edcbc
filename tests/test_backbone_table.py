"""The README's method x backbone-family table, produced here so that it cannot go stale.

Every cell is tried on the family's tiny random configuration (``promptlab.backbones.TINY_CONFIGS``):
"runs" means the method was built, fitted (training-free methods), trained 2 optimizer steps through :func:`promptlab.engine.train`
(zero-shot has nothing to train) and evaluated through :func:`promptlab.engine.evaluate`; otherwise the
cell holds "no: " and the method's own refusal (a ``ValueError`` at construction). Any other error fails the test.

When a method or a family is added, regenerate the README's table with
``PROMPTLAB_UPDATE_README=1 python -m pytest tests/test_backbone_table.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from promptlab.anomaly.method import AnomalyCLIP
from promptlab.backbones import load_clip
from promptlab.engine import evaluate, train
from promptlab.methods import METHODS
from promptlab.prompts import FitData, PromptModule

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- backbone-table:start -->", "<!-- backbone-table:end -->"

#: family (as the README names it) -> tiny configuration with that family's towers, and open_clip tags
FAMILIES: dict[str, tuple[str, str]] = {
    "OpenAI ViT, open_clip -quickgelu": ("tiny-quickgelu", "ViT-B-16 openai, ViT-L-14-quickgelu dfn2b"),
    "OpenAI ResNet": ("tiny-rn", "RN50 openai"),
    "open_clip ViT (LAION, DataComp, DFN)": (
        "tiny",
        "ViT-L-14 laion2b_s32b_b82k, ViT-B-16 datacomp_xl_s13b_b90k",
    ),
    "EVA02": ("tiny-eva02", "EVA02-B-16 merged2b_s8b_b131k"),
    "SigLIP": ("tiny-siglip", "ViT-B-16-SigLIP webli"),
    "PE-Core": ("tiny-pe", "PE-Core-B-16 meta"),
    "MobileCLIP": ("tiny-mobileclip", "MobileCLIP-S1 datacompdr"),
}

#: arguments that fit the tiny towers (2 blocks): the papers' depths are refused there
TINY_KWARGS: dict[str, dict] = {
    "coop": {"n_ctx": 4},
    "cocoop": {"n_ctx": 4},
    "kgcoop": {"n_ctx": 4},
    "ivlp": {"prompt_depth_text": 2, "prompt_depth_vision": 2},
    "maple": {"prompt_depth": 2},
    "promptsrc": {"prompt_depth_text": 2, "prompt_depth_vision": 2},
    "tcp": {"insert_layer": 1},
    "vificlip": {"prompt_depth_text": 2, "prompt_depth_vision": 2},
    "anomalyclip": {"deep_depth": 2, "feature_layers": [1, 2], "dpam_layers": 1},
}
CLASSNAMES = ["cat", "sea lion", "fire truck"]


def _methods() -> dict[str, type[PromptModule]]:
    return {**METHODS, "anomalyclip": AnomalyCLIP}


def _batches(clip, name: str, n: int = 2) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randn(2, 3, clip.image_size, clip.image_size, generator=g)
        inputs = {"images": images}
        if name == "anomalyclip":
            inputs["masks"] = (torch.rand(2, clip.image_size, clip.image_size, generator=g) > 0.5).float()
        out.append((inputs, torch.tensor([0, 1])))
    return out


def try_cell(method: str, arch: str, tmp: Path) -> str:
    """'runs' after 2 training steps and an evaluation, or the method's refusal on this family."""
    clip = load_clip(arch)
    cls = _methods()[method]
    torch.manual_seed(0)
    try:
        module = cls(clip, CLASSNAMES, **TINY_KWARGS.get(method, {}))
    except ValueError as e:  # the method's declared refusal
        return "no: " + str(e).removeprefix(f"{arch}: ").split(";")[0].strip().rstrip(".")
    batches = _batches(clip, method)
    if module.fit_features is not None:  # a training-free method: first its fit, on the batches' features
        with torch.no_grad():
            feats = torch.cat([module.encode_image(inputs["images"]) for inputs, _ in batches])  # [N, D]
        labels = torch.arange(feats.shape[0]) % len(CLASSNAMES)
        views = feats.expand(module.fit_features.views, *feats.shape)
        module.fit(FitData(views, labels, feats, labels))
    params = module.trainable_parameters()
    if params:
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=0.1)
        train(
            module,
            batches,
            opt,
            epochs=1,
            lr_schedule=lambda step: 0.1,
            generator=torch.Generator().manual_seed(0),
            run_dir=tmp,
            device=torch.device("cpu"),
            log_every=100,
        )
        assert any(not torch.equal(b, p) for b, p in zip(before, params)), (
            f"{method} on {arch}: nothing moved"
        )
    images_only = [({"images": inputs["images"]}, labels) for inputs, labels in batches[:1]]
    metrics = evaluate(module, images_only, device=torch.device("cpu"))
    assert metrics["n"] == 2
    return "runs"


def render(cells: dict[tuple[str, str], str]) -> str:
    methods = list(_methods())
    lines = [
        "| family (tiny test config; open_clip tags) | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for fam, (arch, tags) in FAMILIES.items():
        row = [cells[(m, fam)] for m in methods]
        lines.append(f"| {fam} (`{arch}`; {tags}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    out = {}
    for fam, (arch, _) in FAMILIES.items():
        for m in _methods():
            out[(m, fam)] = try_cell(m, arch, tmp_path_factory.mktemp(f"{m}-{arch}"))
    return out


def test_text_only_methods_run_on_every_family(cells) -> None:
    """CoOp-family prompts need only a text tower FrozenCLIP drives: every family runs them."""
    for m in ("zeroshot", "coop", "cocoop", "kgcoop"):
        for fam in FAMILIES:
            assert cells[(m, fam)] == "runs", (m, fam, cells[(m, fam)])


def test_readme_table_is_current(cells) -> None:
    """The README's table is exactly what the cells give (regenerate: PROMPTLAB_UPDATE_README=1)."""
    table = render(cells)
    text = README.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    assert pattern.search(text), f"README.md lacks the {START} ... {END} markers"
    want = f"{START}\n{table}\n{END}"
    if os.environ.get("PROMPTLAB_UPDATE_README") == "1":
        README.write_text(pattern.sub(lambda _: want, text))
        text = README.read_text()
    assert pattern.search(text).group(0) == want, (
        "README's method x backbone table is stale; regenerate it with "
        "PROMPTLAB_UPDATE_README=1 python -m pytest tests/test_backbone_table.py"
    )
